"""What a caller of the library hands in and gets back: options, events, the report.

Field names follow CRIU's stats where they mean the same (``pages_written``, ``frozen_time``
as ``downtime_ms``) and DESIGN.md's vocabulary elsewhere.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Union

from agent.homelink import parse_lost
from agent.cgroups import check_path as check_cgroup_path
from agent.sched import check_affinity
from precopy.policy import PrecopyPolicy
from transport.frozen import frozen
from transport.levels import Level, check_level
from transport.protocol import AGENT_COMMAND

Compression = Union[int, None, Literal["auto"]]
# Measured on the test hosts: stopping the threads, collecting and restoring the state and
# letting the process run take about this long whatever the memory size.
FREEZE_OVERHEAD_MS = 10.0


def check_redirect(redirect: Mapping[int, str]) -> None:
    """fd -> path pairs as ``--redirect FD=PATH`` gives them: fds >= 0, absolute paths."""
    for fd, path in redirect.items():
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"redirect: {fd!r} is not a file descriptor number")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"redirect: fd {fd} -> {path!r}: the path must be absolute")


@frozen
class MigrationOptions:
    """How to migrate. Every field has a default that suits a LAN between two hosts."""

    downtime_target_ms: float = 30.0      # stop pre-copying when the rest fits in this at the measured bandwidth
    bandwidth_limit: float | None = None  # bytes/s the page stream may use; None: as fast as the link goes
    max_rounds: int = 10                  # pre-copy rounds, round 0 included
    max_bytes_factor: float = 3.0         # stop pre-copying after sending this many times the memory
    tracker: str = "auto"                 # auto, uffd-wp, soft-dirty, checksum
    compress_level: Level = "auto"        # "auto", None (raw) or a zstd level
    data_channel: Literal["auto", "ssh", "tcp"] = "auto"   # auto: tcp where the source can connect, else ssh
    ssh_config: str | None = None         # like ssh -F FILE
    agent_command: str = AGENT_COMMAND    # what runs on remote hosts
    precopy: bool = True                  # False: stop-and-copy (freeze, send everything)
    dry_run: bool = False                 # preflight only
    link_timeout_s: float = 30.0          # silence after which an agent settles on its own
    call_timeout_s: float = 600.0         # longest any one step may take
    fs: tuple[Any, ...] = ()              # filesystem hooks: FsHook objects or "KIND:/path" specs
    fs_replace: bool = False              # let hooks replace data already at the destination path
    redirect: Mapping[int, str] = field(default_factory=dict)   # fd -> absolute path on the destination
                                          # that takes the place of a pipe, socket or terminal to the outside
    new_pid: bool = False                 # run under a new pid; by default it keeps its pid and thread ids
    stand_in: bool | Literal["auto"] = False   # leave a stand-in at home for the parent (agent.standin);
                                          # auto: when the parent is not its pid namespace's init
    stand_in_lost: str = "exit"           # the stand-in's link lost: "kill", or "exit:N" (exit: 240)
    relay: tuple[int, ...] = ()           # with a stand-in: fds (pipes to the outside) whose output
                                          # the moved process writes goes back through it
    affinity: str = "refuse"              # a thread pinned to CPUs the destination lacks: "refuse" the
                                          # move, or "warn" (pinned to those it has, or none) and move it
    cgroup: str | None = None             # the unified cgroup (as /proc/PID/cgroup names it) the process
                                          # joins on the destination instead of its own; it must exist there

    def __post_init__(self) -> None:
        check_level(self.compress_level)
        if self.data_channel not in ("auto", "ssh", "tcp"):
            raise ValueError("data_channel must be 'auto', 'ssh' or 'tcp'")
        if self.bandwidth_limit is not None and self.bandwidth_limit <= 0:
            raise ValueError("bandwidth_limit must be > 0")
        if self.link_timeout_s <= 0:
            raise ValueError("link_timeout_s must be > 0")
        check_redirect(self.redirect)
        if self.stand_in not in (True, False, "auto"):
            raise ValueError("stand_in must be True, False or 'auto'")
        parse_lost(self.stand_in_lost)
        check_affinity(self.affinity)
        if self.cgroup is not None:
            check_cgroup_path(self.cgroup)
        for fd in self.relay:
            if not isinstance(fd, int) or fd < 0:
                raise ValueError(f"relay: {fd!r} is not a file descriptor number")
            if fd in self.redirect:
                raise ValueError(f"fd {fd} is both redirected and relayed: choose one")
        if self.relay and not self.stand_in:
            raise ValueError("--relay sends output back through the stand-in: give --stand-in too")
        self.policy()     # validates the pre-copy thresholds

    def policy(self) -> PrecopyPolicy:
        return PrecopyPolicy(**self.policy_args())

    def policy_args(self) -> dict[str, Any]:
        return {"downtime_target_ms": self.downtime_target_ms, "max_rounds": self.max_rounds,
                "max_bytes_factor": self.max_bytes_factor, "freeze_overhead_ms": FREEZE_OVERHEAD_MS}


# --- events ---------------------------------------------------------------------------------

@frozen
class PhaseChanged:
    phase: str


@frozen
class PreflightDone:
    pid: int
    comm: str
    memory_bytes: int
    threads: int
    tracker: str
    tracker_reason: str


@frozen
class DataChannelChosen:
    """How the pages will go: ``channel`` "tcp" (straight to the destination) or "ssh"
    (relayed through kcr-migrate), and ``detail`` (where to and how, or why not direct)."""

    channel: str
    detail: str


@frozen
class RoundDone:
    """One pre-copy round sent (``stats`` as in ``precopy.policy.RoundStats``)."""

    round: int
    stats: dict[str, Any]


@frozen
class WarningRaised:
    message: str


@frozen
class Finished:
    report: "MigrationReport"


Event = Union[PhaseChanged, PreflightDone, DataChannelChosen, RoundDone, WarningRaised, Finished]


@dataclass
class MigrationReport:
    """The outcome. ``state``: done (the process runs on the destination), rolled-back (it runs
    on the source, untouched), dry-run, or unsettled (see ``message``)."""

    pid: int
    source_host: str
    dest_host: str
    state: str = "preflight"
    new_pid: int = 0
    rounds: int = 0
    stop_reason: str = ""
    downtime_ms: float = 0.0
    downtime_uncertainty_ms: float = 0.0
    frozen_at: float = 0.0             # when its first thread stopped, and when it ran on the
    running_at: float = 0.0            # destination: time.monotonic() of the calling process
    total_ms: float = 0.0
    bytes_raw: int = 0
    bytes_on_wire: int = 0
    frozen_bytes_raw: int = 0          # sent while the process was frozen
    frozen_bytes_on_wire: int = 0
    memory_bytes: int = 0
    tracker: str = ""
    tracker_reason: str = ""
    data_channel: str = ""             # what the pages went over: "tcp" (direct) or "ssh" (relayed by us)
    data_channel_note: str = ""        # and why: the address and cipher, or why not direct
    per_round: list[dict[str, Any]] = field(default_factory=list)
    final_round: dict[str, Any] = field(default_factory=dict)
    phase_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    fs: list[dict[str, Any]] = field(default_factory=list)   # per hook: its passes and final pass
    processes: list[dict[str, Any]] = field(default_factory=list)   # the job as restored: pid, ppid, comm, threads
    stand_in: dict[str, Any] = field(default_factory=dict)   # with --stand-in: the stand-in's pid, keeper, deputy
    late_signals: list[str] = field(default_factory=list)    # sent at the source while frozen, delivered here

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dest_host"] = self.dest_host
        return d
