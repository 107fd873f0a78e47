"""OpenSSH for testbed hosts: key pairs, sshd and ssh configuration, starting and probing sshd.

Like ``examples/_namespaces.py`` this knows nothing of a testbed's layout; ``examples/testbed.py``
passes the paths and addresses and decides which file goes where.
"""
from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from examples._namespaces import SYSTEM_PATH, ns_id, nsenter_argv, pid_alive, root_pid, run, tool

SSH_PORT = 22
SSHD_START_TIMEOUT = 15.0


def session_path() -> str:
    """PATH for ssh sessions: this Python's script dirs first, so `kcr-agent` is found."""
    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable), *SYSTEM_PATH]
    return ":".join(dict.fromkeys(d for d in dirs if d))


def session_pythonpath() -> str:
    """` PYTHONPATH=...` when whoever makes the hosts has one (a development tree), else "".

    The hosts then run the same kcr-agent code as the one who made them.
    """
    value = os.environ.get("PYTHONPATH", "")
    return f" PYTHONPATH={value}" if value and " " not in value else ""


def keygen(key: Path, comment: str) -> str:
    """Make an ed25519 key pair without passphrase at ``key`` and ``key.pub``; the public key."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
    return key.with_suffix(".pub").read_text(encoding="ascii")


def sshd_config(host: str, address: str, *, host_key: Path, pid_file: Path,
                authorized_keys: Path) -> str:
    """sshd_config for ``host``: root logs in with a key from ``authorized_keys`` only."""
    return "\n".join([
        f"# sshd for testbed host {host}; written by examples/testbed.py",
        f"ListenAddress {address}:{SSH_PORT}",
        "AddressFamily inet",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        # SHLVL=1 makes bash treat `ssh host cmd` as a nested shell, so it skips ~/.bashrc:
        # sessions get exactly this PATH, and no rc-file side effects (root's bashrc here runs
        # `pyenv rehash`, whose global lock, left stale by one killed session, stalls every
        # later session for 60 s).
        f"SetEnv PATH={session_path()} SHLVL=1{session_pythonpath()}",
        "Subsystem sftp internal-sftp",
        "",
    ])


def ssh_config(path: Path, hosts: Sequence[tuple[str, str]], *, identity: Path,
               known_hosts: Path) -> str:
    """The ssh config at ``path`` for ``(host, address)`` pairs: root, this key, these host keys."""
    blocks = [f"# ssh -F {path} HOST; written by examples/testbed.py\n"]
    for host, address in hosts:
        blocks.append("\n".join([
            f"Host {host}",
            f"    HostName {address}",
            f"    Port {SSH_PORT}",
            "    User root",
            f"    IdentityFile {identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    BatchMode yes",
            "    ConnectTimeout 10",
            "    LogLevel ERROR",
            "",
        ]))
    return "\n".join(blocks)


def start_sshd(netns: Path, mntns: Path, config: Path, log: Path,
               pidns: Path | None = None) -> None:
    """Start sshd with ``config`` inside these namespaces, logging to ``log``."""
    argv = nsenter_argv(netns, mntns, [tool("sshd"), "-f", str(config), "-E", str(log)],
                        pidns=pidns)
    run(argv, timeout=SSHD_START_TIMEOUT)  # sshd daemonizes once it has parsed its config


def sshd_pid(pid_file: Path, mntns: Path, pidns: Path | None = None) -> int | None:
    """The pid in ``pid_file`` if that process lives, inside mount namespace ``mntns``.

    With ``pidns``, sshd runs in that pid namespace and wrote its pid there: the pid returned is
    the same process's pid in this process's pid namespace.
    """
    try:
        written = int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    pid = written if pidns is None else root_pid(pidns, written)
    if pid is None:
        return None
    in_host = ns_id(f"/proc/{pid}/ns/mnt") == ns_id(mntns)
    return pid if in_host and pid_alive(pid) else None


def sshd_log_tail(log: Path) -> str:
    """`` (sshd.log: LAST LINE)`` to append to an error message, or ``""``."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return f" (sshd.log: {lines[-1]})" if lines else ""
