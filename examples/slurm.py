"""A real Slurm cluster on the test hosts: munged, slurmctld, and one slurmd per host.

    python3 examples/testbed.py up --hosts hostA hostB
    python3 examples/slurm.py up            # on top of that testbed
    export SLURM_CONF=/run/kcr-slurm/slurm.conf
    sbatch -w hostA job.sh; squeue; sacct -c
    python3 examples/slurm.py status
    python3 examples/slurm.py down          # before the testbed goes down

Everything lives in a state directory of its own (default ``/run/kcr-slurm``, or
``$KCR_SLURM_DIR``): a munge key and munged (its own socket, pid, seed and log files, running
as root), a generated ``slurm.conf`` naming those, slurmctld's state, one spool directory per
node, the logs and the job-completion file.  Nothing system-wide is read or written: every
daemon gets the config with ``-f``, every client with ``SLURM_CONF``; ``/etc/munge`` and
``/etc/slurm`` are not used.

The layout:

* munged and slurmctld run in this machine's own namespaces.  slurmctld listens on a port of
  its own (``SlurmctldPort``), and the nodes reach it at the testbed's bridge address: the
  hosts have no route anywhere else.  ``SlurmctldHost`` is this machine's short hostname, which
  slurmctld checks its own against.
* one slurmd per host runs inside that host's network and mount namespaces (and its pid
  namespace, if it has its own) with ``slurmd -N HOST``; ``NodeAddr`` is the host's address.
  All the slurmd listen on the same port, each in its own network namespace.  The munge socket
  is a path, which network namespaces do not separate, so one munged serves every node, as one
  key shared by all would on a real cluster.
* jobs run on the node named by ``-w``: their batch shell is a child of that node's
  slurmstepd, inside the host's namespaces, so kcr-migrate reaches them over the host's sshd.

Facts about Debian bookworm's Slurm (``slurm-wlm`` 22.05.8) established here:

* several slurmd run on one machine without ``--enable-multiple-slurmd``: ``-N NAME`` works, and
  ``%n`` in ``SlurmdSpoolDir``, ``SlurmdPidFile`` and ``SlurmdLogFile`` gives each its own
  files.  Each node reports the whole machine (2 CPUs, all memory): ``SlurmdParameters=
  config_overrides`` makes the config's ``CPUs`` and ``RealMemory`` the node's.
* ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` need no cgroups (this
  machine has cgroup v1; slurmd never touches it).  slurmd logs that it cannot load the PMIx
  library (mpi/pmix): harmless with ``MpiDefault=none``.
* accounting without slurmdbd: ``AccountingStorageType=accounting_storage/none`` with
  ``JobCompType=jobcomp/filetxt``; then ``sacct -c`` (``--completion``) reads the completion
  file and shows a finished job's State and ExitCode (``COMPLETED 0:0``); plain ``sacct`` says
  accounting storage is disabled.  ``MinJobAge`` keeps finished jobs in ``squeue``/``scontrol``
  for an hour.
* ``sinfo --json`` and ``squeue --json`` work (openapi v0.0.38 output); ``scontrol show node``
  has no ``--json`` in 22.05, only ``-o`` (one line of key=value).  ``sinfo --json``'s
  ``cpu_load`` is the load average times 100.
* ``scontrol listpids JOBID NODE`` lists a job's pids (batch shell, its workload) from that
  node's slurmstepd socket in the spool dir; without the node name it needs the machine's
  hostname to be a node name and fails ("Couldn't find nodename").  On a host with its own pid
  namespace the pids are that namespace's.
* with slurmctld down, ``sinfo --json``/``squeue --json`` wait about 9 s and then exit 0 with an
  empty list and "Unspecified error"; ``scontrol ping`` says DOWN at once.  With ``SLURM_CONF``
  naming a missing file every command retries for 60 s before failing: check the file first.
* up takes 0.3-1 s here (munged, slurmctld listening, every slurmd registered and idle); a
  trivial job then takes 0.5-3 s from sbatch to COMPLETED (scheduling passes, not the hosts).
* a job whose workload kcr-migrate moves away (without a home stand-in) ends at once: the batch
  shell's ``wait`` returns 137 and Slurm records ``FAILED 137:0``; moving the batch shell with
  its workload lets the job run to its end on the other host, but slurmstepd saw its shell die
  of SIGKILL and records ``FAILED 0:9``.

The same logic is importable: ``SlurmCluster(testbed).up()``.  Needs root.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._namespaces import (  # noqa: E402
    TestbedError,
    TestbedUnavailable,
    kill_until_gone,
    ns_id,
    pid_alive,
    run,
    tcp_open,
    tool,
)
from examples.testbed import Testbed  # noqa: E402

__all__ = ["SlurmCluster", "SlurmUnavailable", "check_slurm_available", "default_state_dir", "main"]

DEFAULT_STATE_DIR = Path("/run/kcr-slurm")
STATE_DIR_ENV = "KCR_SLURM_DIR"
DEFAULT_CTLD_PORT = 6827
DEFAULT_SLURMD_PORT = 6828
DEFAULT_CLUSTER = "kcr"
DEFAULT_PARTITION = "batch"
STATE_FILE = "slurm.json"
STATE_VERSION = 1
START_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0
DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "munged")
# Program -> Debian package providing it.
SLURM_TOOLS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sinfo": "slurm-client",
               "sbatch": "slurm-client", "scontrol": "slurm-client", "squeue": "slurm-client",
               "sacct": "slurm-client", "scancel": "slurm-client"}


class SlurmUnavailable(TestbedUnavailable):
    """Slurm or munge is not installed here."""

    __test__ = False


def check_slurm_available() -> None:
    """Raise SlurmUnavailable unless munge and Slurm's daemons and commands are installed."""
    for name, package in SLURM_TOOLS.items():
        try:
            tool(name)
        except TestbedUnavailable:
            raise SlurmUnavailable(f"`{name}` not found: apt-get install {package} "
                                   "(or run scripts/setup)") from None


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    name: str
    state: str          # sinfo's, e.g. idle, mixed, down; "-" if slurmctld does not answer
    slurmd: bool        # a slurmd of this cluster runs in the node's host


class SlurmCluster:
    """Slurm on a testbed's hosts: ``up()``, submit jobs with ``env()`` as environment, ``down()``."""

    __test__ = False

    def __init__(self, bed: Testbed, state_dir: str | os.PathLike[str] | None = None, *,
                 nodes: Sequence[str] | None = None, cluster: str = DEFAULT_CLUSTER,
                 partition: str = DEFAULT_PARTITION, ctld_port: int = DEFAULT_CTLD_PORT,
                 slurmd_port: int = DEFAULT_SLURMD_PORT) -> None:
        self.bed = bed
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.nodes: tuple[str, ...] = tuple(nodes) if nodes is not None else bed.hosts
        self.cluster = cluster
        self.partition = partition
        self.ctld_port = ctld_port
        self.slurmd_port = slurmd_port
        if not self.state_dir.is_absolute() or len(self.state_dir.parts) < 3:
            raise TestbedError(f"state dir must be an absolute path below /x/: {self.state_dir}")
        for node in self.nodes:
            if node not in bed.hosts:
                raise TestbedError(f"node {node!r} is not a host of the testbed "
                                   f"({', '.join(bed.hosts)})")
        if not self.nodes:
            raise TestbedError("a Slurm cluster needs at least one node")

    # --- paths ---

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.state_dir / "munge" / "munge.sock"

    @property
    def jobcomp_path(self) -> Path:
        return self.state_dir / "jobcomp.txt"

    def log_path(self, daemon: str) -> Path:
        """slurmctld's log, or a node's slurmd log (``daemon`` is the node name)."""
        name = "slurmctld" if daemon == "slurmctld" else f"slurmd-{daemon}"
        return self.state_dir / "log" / f"{name}.log"

    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` pointing at the cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    # --- commands ---

    def command(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
        """Run a Slurm client command against this cluster; its stdout."""
        return _run_env(argv, self.env(), check=check, timeout=timeout).stdout

    # --- up ---

    def up(self) -> None:
        """Start the cluster (after removing whatever an earlier one left); return once every
        node is idle.  If starting fails, everything started is removed again."""
        check_slurm_available()
        self.down()
        try:
            self._write_files()
            self._start_munged()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self.wait_idle()
        except BaseException:
            try:
                self.down()
            except TestbedError as exc:
                print(f"slurm: cleanup after failed up: {exc}", file=sys.stderr)
            raise

    def _write_files(self) -> None:
        for sub, mode in (("", 0o755), ("munge", 0o755), ("key", 0o700), ("ctld", 0o700),
                          ("spool", 0o755), ("log", 0o755)):
            self.state_dir.joinpath(sub).mkdir(mode=mode, parents=True, exist_ok=True)
        state = {"version": STATE_VERSION, "testbed": str(self.bed.state_dir),
                 "nodes": list(self.nodes), "cluster": self.cluster, "partition": self.partition,
                 "ctld_port": self.ctld_port, "slurmd_port": self.slurmd_port}
        self.state_dir.joinpath(STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        key = self.state_dir / "key" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        for node in self.nodes:
            self.state_dir.joinpath("spool", node).mkdir(mode=0o755, exist_ok=True)
        self.conf_path.write_text(self.slurm_conf(), encoding="utf-8")
        self.state_dir.joinpath("plugstack.conf").write_text("# no SPANK plugins\n")

    def slurm_conf(self) -> str:
        """The cluster's slurm.conf."""
        d = self.state_dir
        cpus = os.cpu_count() or 1
        memory_mib = max(256, _mem_total_mib() // (2 * len(self.nodes)))
        lines = [
            "# Slurm on the kcr-migrate test hosts; written by examples/slurm.py",
            f"ClusterName={self.cluster}",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.bed.bridge_address})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/ctld",
            f"SlurmctldPidFile={d}/ctld/slurmctld.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmdPidFile={d}/spool/%n/slurmd.pid",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_path}",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # 1, not 2: a node the admin (a test) sets DOWN stays down; with 2 the next
            # registration slurmctld asks of a DOWN node returns it to service
            "ReturnToService=1",
            "MinJobAge=3600",
            "SlurmdParameters=config_overrides",
            f"PlugStackConfig={d}/plugstack.conf",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeAddr={self.bed.address(node)} CPUs={cpus} "
                         f"RealMemory={memory_mib} State=UNKNOWN")
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _start_munged(self) -> None:
        key = self.state_dir / "key"
        # munged forks, and its parent exits once the socket accepts requests.
        run(["munged", f"--socket={self.munge_socket}", f"--key-file={key}/munge.key",
             f"--log-file={key}/munged.log", f"--pid-file={key}/munged.pid",
             f"--seed-file={key}/munged.seed"], timeout=START_TIMEOUT)

    def _start_slurmctld(self) -> None:
        _run_env(["slurmctld", "-f", str(self.conf_path)], self.env(), timeout=START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not tcp_open(self.bed.bridge_address, self.ctld_port):
            if time.monotonic() > deadline or not self._ctld_pids():
                raise TestbedError(f"slurmctld is not listening on {self.bed.bridge_address}:"
                                   f"{self.ctld_port}{_log_tail(self.log_path('slurmctld'))}")
            time.sleep(0.05)

    def _start_slurmd(self, node: str) -> None:
        # slurmd daemonizes: nsenter (and setpriv, in a pid namespace) return as it forks.
        argv = self.bed.nsenter_argv(node, [tool("slurmd"), "-f", str(self.conf_path), "-N", node])
        _run_env(argv, self.env(), timeout=START_TIMEOUT)

    def wait_idle(self, timeout: float = START_TIMEOUT) -> None:
        """Return once sinfo shows every node idle."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                logs = "".join(_log_tail(self.log_path(n)) for n in self.nodes
                               if states.get(n) != "idle")
                raise TestbedError(f"Slurm nodes are not idle after {timeout:g} s: {states}{logs}")
            time.sleep(0.1)

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's compact state (``idle``, ``mix``, ``drain``, ``down*``, ...)."""
        out = self.command(["sinfo", "--noheader", "--Node", "-o", "%N %t"], check=False)
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    # --- status ---

    def status(self) -> list[NodeStatus]:
        ctld = bool(self._ctld_pids())
        states = self.node_states() if ctld else {}
        running = self._slurmd_nodes()
        return [NodeStatus(n, states.get(n, "-"), n in running) for n in self.nodes]

    def _ctld_pids(self) -> list[int]:
        return [p for p, exe in _processes() if exe == "slurmctld" and self._mine(p)]

    def _mine(self, pid: int) -> bool:
        """Was this process started with a path in this cluster's state dir?"""
        return f"{self.state_dir}/" in _cmdline(pid)

    def _slurmd_nodes(self) -> set[str]:
        netns = {ns_id(self.bed.netns_path(n)): n for n in self.nodes}
        return {netns[ns] for p, exe in _processes() if exe == "slurmd"
                and (ns := ns_id(f"/proc/{p}/ns/net")) in netns}

    # --- down ---

    def down(self) -> None:
        """Stop every daemon and job of this cluster and remove its state dir; safe at any time.

        Ours are: slurmctld and munged started with this state dir's paths, and every slurmd and
        slurmstepd inside one of the testbed's hosts (each host runs at most one cluster), with
        every process descended from them (the jobs).
        """
        ids = {i for i in (ns_id(self.bed.netns_path(h)) for h in self.bed.hosts) if i}
        roots = []
        for pid, exe in _processes():
            if exe in ("slurmctld", "munged") and self._mine(pid):
                roots.append(pid)
            elif exe in ("slurmd", "slurmstepd") and ns_id(f"/proc/{pid}/ns/net") in ids:
                roots.append(pid)
        _kill_trees(roots)
        if self.state_dir.joinpath(STATE_FILE).exists() or self.state_dir.joinpath("slurm.conf").exists():
            shutil.rmtree(self.state_dir)
        elif self.state_dir.is_dir() and any(self.state_dir.iterdir()):
            raise TestbedError(f"{self.state_dir} holds files examples/slurm.py did not make: "
                               "pick another state dir")

    def __enter__(self) -> SlurmCluster:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()


# --- processes -----------------------------------------------------------------------------------

def _processes() -> list[tuple[int, str]]:
    """(pid, program) for every process whose executable is one of ``DAEMONS``.

    Debian installs the Slurm daemons as alternatives: /usr/sbin/slurmd is a link to
    slurmd-wlm, which is what /proc/PID/exe names.
    """
    programs = {}
    for name in DAEMONS:
        try:
            programs[os.path.realpath(tool(name))] = name
        except TestbedUnavailable:
            pass
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                exe = os.readlink(f"/proc/{entry.name}/exe")
            except OSError:
                continue
            program = programs.get(exe.removesuffix(" (deleted)"))
            if program is not None:
                found.append((int(entry.name), program))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _kill_trees(roots: Sequence[int]) -> None:
    """SIGKILL these processes and all their descendants; wait until none is alive."""
    targets: set[int] = set()

    def alive() -> list[int]:
        tree = _children()
        todo = list(roots) + [p for p in targets if pid_alive(p)]
        while todo:
            pid = todo.pop()
            if pid not in targets:
                targets.add(pid)
                todo.extend(tree.get(pid, []))
        return sorted(p for p in targets if pid_alive(p))
    kill_until_gone(alive, "Slurm processes")


def _run_env(argv: Sequence[str], env: dict[str, str], *, check: bool = True,
             timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    argv = [tool(argv[0]), *argv[1:]] if "/" not in argv[0] else list(argv)
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"`{' '.join(argv)}` did not finish in {timeout:g} s") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"`{' '.join(argv)}` failed: "
                           f"{lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc


def _mem_total_mib() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "error" in ln]
    except OSError:
        return ""
    return f" ({path.name}: {lines[-1]})" if lines else ""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


# --- CLI -----------------------------------------------------------------------------------------

def _cluster_from_state(args: argparse.Namespace) -> SlurmCluster | None:
    state_dir = args.state_dir or default_state_dir()
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("version") != STATE_VERSION:
        raise TestbedError(f"unknown Slurm state in {state_dir}: remove it")
    bed = Testbed.from_state(state["testbed"])
    return SlurmCluster(bed, state_dir, nodes=state["nodes"], cluster=state["cluster"],
                        partition=state["partition"], ctld_port=state["ctld_port"],
                        slurmd_port=state["slurmd_port"])


def cmd_up(args: argparse.Namespace) -> int:
    bed = Testbed.from_state(args.testbed_dir)
    cluster = SlurmCluster(bed, args.state_dir, nodes=args.nodes, ctld_port=args.port,
                           slurmd_port=args.port + 1)
    started = time.monotonic()
    cluster.up()
    print(f"Slurm up in {time.monotonic() - started:.1f} s: nodes {', '.join(cluster.nodes)} "
          f"in partition {cluster.partition}")
    print(f"export SLURM_CONF={cluster.conf_path}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    cluster = _cluster_from_state(args)
    if cluster is None:
        print("no Slurm cluster recorded: nothing to remove")
        return 0
    cluster.down()
    print(f"Slurm down ({cluster.state_dir} removed)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = _cluster_from_state(args)
    if cluster is None:
        print("no Slurm cluster recorded; run: examples/slurm.py up")
        return 1
    healthy = True
    for st in cluster.status():
        healthy = healthy and st.slurmd and st.state not in ("-", "down", "down*")
        print(f"{st.name:<10} {st.state:<10} slurmd {'running' if st.slurmd else 'not running'}")
    print(f"export SLURM_CONF={cluster.conf_path}")
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slurm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"Slurm state directory (default ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start munged, slurmctld and a slurmd per testbed host")
    up.add_argument("--testbed-dir", type=Path, default=None,
                    help="the testbed's state directory (default as examples/testbed.py)")
    up.add_argument("--nodes", nargs="+", default=None, metavar="HOST",
                    help="testbed hosts that become nodes (default: all)")
    up.add_argument("--port", type=int, default=DEFAULT_CTLD_PORT,
                    help="slurmctld's port; slurmd's is the next one")
    sub.add_parser("down", help="stop the daemons and jobs, remove the state directory")
    sub.add_parser("status", help="show each node's state")
    args = parser.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise TestbedUnavailable("must run as root (namespaces and daemons need it)")
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.command](args)
    except TestbedError as exc:
        print(f"slurm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slurm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
