"""The destination role of the agent: build the process as its memory arrives, restore the
rest, hold it stopped until told to go.

The restorer (``agent.restore``) runs on one tracer thread of this agent and seizes its stub
with EXITKILL: if this agent dies before GO, the half-built process dies with it. If it loses
kcr-migrate instead, the protocol core (``migrate.phases``, ``DESTINATION``) says what its
state does: destroy the copy before GO, let it run on after. Pages are
written in worker threads: by UFFDIO_COPY where the process has none yet (``agent.fill``),
through /proc/PID/mem where a later round rewrites them.

Methods: ``dest_check`` (preflight), ``dest_receive`` (the ordered stream from the source:
header, layouts, pages, state), ``dest_restore`` (everything else; the process is READY,
stopped), ``dest_deputy`` (with ``--stand-in``, in preflight: start the deputy, ``agent.deputy``),
``dest_go`` (let it run; reports when every thread ran), ``dest_abort``.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from agent import cgroups, inet_sockets, locks, mempolicy, sched, urgency
from agent.shared_memory import check_segments
from precopy import sysv
from precopy.kernel import boot_id
from agent import signals as signals_mod
from agent.files import check_files, check_machine
from agent.homelink import MAX_FD, RELAY_DIR, parse_lost
from agent.inflight import InFlight
from agent.logs import log_path, open_log
from agent.procfs import check_restore_privileges
from agent.restore_session import RestoreSession
from agent.tracer import Tracer
from agent.unix_names import Bound
from agent.unix_names import check as check_name
from migrate.phases import DESTINATION, Action, DestEvent, DestState, Failure, Machine
from transport.frozen import ready_all
from transport.errors import MigrationError, PermissionDenied, ProtocolError, RestoreError
from transport.pages import PageBatch
from transport.rpc import CallContext
from transport.schema import MAX_CPUS, MAX_NUMNODES, InetSockets, ProcessState

MEMORY_MARGIN = 1.1
MAX_NAMES = 1 << 16          # socket names in a summary
MAX_CGROUP_LINES = 64      # /proc/PID/cgroup lines of one process in a summary (one per hierarchy)


@dataclass
class DestSession:
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    tracer: Tracer = field(default_factory=lambda: Tracer(name="kcr-restorer"))
    restore: RestoreSession = field(default_factory=RestoreSession)
    pages: int = 0
    machine: Machine[DestState, DestEvent] = field(default_factory=lambda: Machine(DESTINATION))
    received: trio.Event | None = None      # set when the page stream has ended (dest_receive)
    receive_error: BaseException | None = None
    inflight: InFlight = field(default_factory=InFlight)     # dest_receive, while it runs
    deputy: subprocess.Popen[bytes] | None = None            # the stand-in's deputy (dest_deputy)
    deputy_control: socket.socket | None = None              # where the restored process goes to it
    state_ms: float = 0.0       # applying the records of the job's state (sent frozen), on the tracer thread
    urgency: urgency.Urgency = field(default_factory=urgency.Urgency)   # a short freeze's steps (``dest_restore``)

    def abort(self) -> None:
        """Destroy whatever was built (blocking; from any thread)."""
        self.urgency.end()
        self.machine.handle(DestEvent.ABORT)
        self.end_deputy()
        self.tracer.call(self.restore.abort)
        self.tracer.close()

    def settle(self, failure: Failure) -> None:
        """Kcr-migrate is gone: what the protocol core says for this state (blocking)."""
        self.urgency.end()
        action = self.machine.action(failure)
        if action is Action.DESTROY_COPY:
            self.abort()
        elif action is Action.RUN_ON:
            self.let_run()

    def let_run(self) -> None:
        """The process runs (or is being let run): its deputy lives on with it, never waited
        for here; the tracer lets it go."""
        self.tracer.close()
        if self.deputy is not None:
            DEPUTIES.append(self.deputy)
            self.deputy = None
        self.let_deputy_go()

    def end_deputy(self) -> None:
        if self.deputy is not None:
            self.deputy.kill()
            self.deputy.wait()
            self.deputy = None
        self.let_deputy_go()

    def let_deputy_go(self) -> None:
        if self.deputy_control is not None:
            self.deputy_control.close()
            self.deputy_control = None


SESSIONS: dict[int, DestSession] = {}
# The same sessions by token: a direct data channel names the migration it carries.
BY_TOKEN: dict[str, DestSession] = {}


def _host() -> str:
    return socket.gethostname()


def _session(ctx: CallContext, create: bool = False) -> DestSession:
    s = SESSIONS.get(id(ctx.rpc))
    if s is None:
        if not create:
            raise RestoreError("no migration is in progress on this connection")
        s = SESSIONS[id(ctx.rpc)] = DestSession()
        BY_TOKEN[s.token] = s
    return s


def _forget(s: DestSession) -> None:
    BY_TOKEN.pop(s.token, None)


def check_ids_free(ids: list[int], host: str, tree: bool = False) -> None:
    """The pid and thread ids the process (``tree``: the processes of a tree) keeps are not
    in use here; ``ids[0]`` is the (root) process's pid."""
    taken = [i for i in ids if os.path.exists(f"/proc/{i}")]
    if taken:
        pid = ids[0]
        same = " (source and destination are one host: the process itself holds them)" \
            if os.path.exists(f"/proc/{pid}") and pid in taken else ""
        fix = ("a process tree keeps its pids; end what holds them" if tree else
               "the process keeps its pid and thread ids; end what holds them, or migrate under a new pid "
               "with --new-pid")
        raise RestoreError(f"{'pid' if len(taken) == 1 else 'pids'} {', '.join(map(str, taken[:10]))} taken on "
                           f"{host}{same}: {fix}", host=host, pid=pid)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


async def dest_check(ctx: CallContext, *, summary: dict[str, Any], new_pid: bool = False,
                     affinity: str = "refuse", cgroup: str | None = None) -> dict[str, Any]:
    """Preflight: can this host run the process the source described? Unless ``new_pid``,
    its pid and thread ids must be free here. ``affinity`` "warn": threads pinned to CPUs
    this host lacks are no refusal, but a warning (``agent.sched``). ``cgroup``: the unified
    cgroup the process joins here instead of its own (it must exist)."""
    host = ctx.rpc.local.hostname or _host()
    if os.geteuid() != 0:
        raise PermissionDenied(f"kcr-agent on {host} runs as uid {os.geteuid()}: restoring a process "
                               "(its memory map and credentials) needs root", host=host)
    check_restore_privileges(host)
    await trio.to_thread.run_sync(check_machine, summary, host)
    very = await trio.to_thread.run_sync(check_files, list(summary.get("files", [])), host)
    try:
        segments = [sysv.from_wire(d) for d in summary.get("sysv", [])]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("the source's summary names a SysV segment that cannot exist", host=host) from None
    await trio.to_thread.run_sync(check_segments, segments, host)
    processes = summary.get("processes") or [{"pid": summary["pid"], "tids": summary.get("tids", [])}]
    if new_pid and len(processes) > 1:
        raise RestoreError(f"pid {summary['pid']} has {len(processes) - 1} descendants: a process tree keeps its "
                           "pids (parents wait for their children by pid); migrate it without --new-pid", host=host)
    if not new_pid:
        ids = [int(p["pid"]) for p in processes]
        ids += [int(t) for p in processes for t in p.get("tids", []) if int(t) != int(p["pid"])]
        check_ids_free(ids, host, tree=len(processes) > 1)
    names = summary.get("unix_names", [])
    if not isinstance(names, list) or len(names) > MAX_NAMES:
        raise RestoreError("the summary's socket names are malformed: corrupt summary", host=host)
    job = frozenset(int(p["pid"]) for p in processes)
    for bound in [Bound.from_wire(n) for n in names]:      # each bound again here: free, or the job's own
        await trio.to_thread.run_sync(check_name, bound, host, job)
    if summary.get("inet_bound"):
        try:
            ports = InetSockets.from_wire(summary["inet_bound"])
            ports.validate()
        except Exception:      # untrusted: whatever it is, it is no list of sockets
            raise ProtocolError("the source's summary names TCP or UDP sockets that cannot exist", host=host) from None
        try:
            await trio.to_thread.run_sync(inet_sockets.check_bindable, ports.sockets, job)
        except RestoreError as exc:
            raise RestoreError(str(exc), host=host) from None
    pinned = summary.get("pinned_cpus", [])
    if not isinstance(pinned, list) or not all(isinstance(c, int) and 0 <= c < MAX_CPUS for c in pinned):
        raise ProtocolError("the source's summary names CPUs that cannot exist", host=host)
    if affinity not in sched.AFFINITY:
        raise ProtocolError(f"dest_check: affinity {affinity!r}", host=host)
    cpus_warning = await trio.to_thread.run_sync(sched.missing_cpus, pinned, host, summary.get("pid"), affinity)
    nodes = summary.get("numa_nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, int) and 0 <= n < MAX_NUMNODES for n in nodes):
        raise ProtocolError("the source's summary names NUMA nodes that cannot exist", host=host)
    nodes_warning = mempolicy.missing_nodes(set(nodes), host, summary.get("pid"), affinity)
    if cgroup is not None:
        if not isinstance(cgroup, str):
            raise ProtocolError("dest_check: cgroup is not a path", host=host)
        try:
            await trio.to_thread.run_sync(cgroups.check_chosen, cgroup, host)
        except ValueError as exc:
            raise RestoreError(str(exc), host=host) from None
    held = locks.from_wire(summary.get("locks", []))
    exempt = [str(p) for p in summary.get("exempt", [])]
    await trio.to_thread.run_sync(locks.check_free, held, host, summary.get("pid"), exempt, very)
    need = int(summary.get("memory_bytes", 0) * MEMORY_MARGIN)
    avail = _mem_available()
    if need > avail:
        raise RestoreError(f"{host} has {avail >> 20} MiB available, the process needs about {need >> 20} MiB",
                           host=host)
    hints = _cgroup_hints(processes, host) if summary.get("boot_id") != boot_id() else {}
    s = _session(ctx, create=True)
    s.machine.handle(DestEvent.CHECK)
    s.restore = RestoreSession([str(p) for p in summary.get("exempt", [])], keep_ids=not new_pid, affinity=affinity,
                               cgroup=cgroup, cgroup_hints=hints)
    return {"mem_available": avail, "hostname": _host(), "session": s.token, "very": sorted(very), "urgent": True,
            "warnings": [w for w in (cpus_warning, nodes_warning) if w]}


def _cgroup_hints(processes: list[Any], host: str) -> dict[int, tuple[str, ...]]:
    """The cgroups each process of the job was in at preflight (/proc/PID/cgroup lines), which
    its stub joins as it is made (``Restorer``): checked, they come from the other host."""
    hints: dict[int, tuple[str, ...]] = {}
    for p in processes:
        lines = p.get("cgroups", [])
        if not isinstance(lines, list) or len(lines) > MAX_CGROUP_LINES or not all(isinstance(x, str) for x in lines):
            raise ProtocolError("the source's summary lists cgroups that cannot be", host=host)
        for line in lines:
            cgroups.parse(line)      # ProtocolError, naming it, for what is not "id:controllers:path"
        hints[int(p["pid"])] = tuple(lines)
    return hints


async def dest_receive(ctx: CallContext, *, session: str | None = None) -> dict[str, Any]:
    """Apply the source's stream as it arrives: layouts on the tracer thread, pages in workers.
    On a direct data channel, ``session`` names the migration (dest_check's token)."""
    if session is None:
        s = _session(ctx)
    else:
        found = BY_TOKEN.get(session)
        if found is None:
            raise ProtocolError("the data channel names no migration in progress here")
        s = found
    s.machine.handle(DestEvent.RECEIVE)
    ready_all()           # what the agent imported since it began: compiled now, not while the job is frozen
    with s.inflight.run("dest_receive"):
        return await _receive(ctx, s)


async def _receive(ctx: CallContext, s: DestSession) -> dict[str, Any]:
    received = s.received = trio.Event()
    try:
        records = batches = 0
        while (item := await ctx.pages.receive_item()) is not None:
            if isinstance(item, PageBatch):
                await trio.to_thread.run_sync(s.restore.write_pages, item)
                s.pages += item.npages
                batches += 1
            else:
                # The records that arrived with it go in the same visit to the tracer thread:
                # a process's state is several records, and a tree's is that many per process.
                group = [item, *ctx.pages.ready_records()]
                records += len(group)
                t0 = time.perf_counter()
                await s.tracer.acall(_take_all, s.restore, group)
                if s.state_ms or any(isinstance(r, ProcessState) for r in group):
                    s.state_ms += (time.perf_counter() - t0) * 1000
    except BaseException as exc:
        s.receive_error = exc
        raise
    finally:
        received.set()
    return {"records": records, "batches": batches, "pages": s.pages}


def _take_all(restore: RestoreSession, items: list[Any]) -> None:
    for item in items:
        restore.take(item)


async def dest_restore(ctx: CallContext, *, urgent: bool = False) -> dict[str, Any]:
    """Restore everything but memory; the process stays stopped (READY). Called while the
    page stream may still be ending: waits for it first. ``urgent``: called as a short
    freeze starts, its last pages, the restore and GO run at real-time priority
    (``agent.urgency``)."""
    s = _session(ctx)
    realtime = s.urgency.begin() if urgent else False     # until it runs, or is destroyed
    try:
        answer = await _restore(s)
        answer["timing"]["realtime"] = int(realtime)
        return answer
    except BaseException:
        s.urgency.end()
        raise


async def _restore(s: DestSession) -> dict[str, Any]:
    if s.received is not None:
        await s.received.wait()
        if isinstance(s.receive_error, MigrationError):
            raise s.receive_error
        if s.receive_error is not None:
            raise ProtocolError("the page stream ended before the process's state arrived")
    if not s.restore.procs:
        raise ProtocolError("the stream ended before the process's state arrived")
    s.machine.check(DestEvent.RESTORED)
    t0 = time.perf_counter()
    await s.tracer.acall(s.restore.finish)
    finish_ms = (time.perf_counter() - t0) * 1000
    _hand_to_deputy(s)
    s.machine.handle(DestEvent.RESTORED)
    return {"pid": s.restore.root.pid, "threads": s.restore.threads, "warnings": s.restore.warnings,
            "processes": s.restore.processes(), "left": s.restore.removed,
            "timing": {"state_records_ms": s.state_ms, "finish_ms": finish_ms}}


async def dest_go(ctx: CallContext, *, signals: list[Any] | None = None) -> dict[str, Any]:
    """Let the process run: the point of no return. Reports the time every thread had run.
    ``signals``: those sent to the job at the source after its state was read
    (``agent.signals``), delivered once it runs."""
    s = _session(ctx)
    if not s.machine.allows(DestEvent.GO):
        raise RestoreError(f"the process is not ready to run (it is {s.machine.state.value})")
    late = signals_mod.check(signals or [])
    s.machine.handle(DestEvent.GO)      # from here a lost link lets it run on
    before = len(s.restore.warnings)
    t0 = time.perf_counter()
    try:
        pid = await s.tracer.acall(s.restore.resume)
    finally:
        s.urgency.end()
    resume_ms = (time.perf_counter() - t0) * 1000
    s.machine.handle(DestEvent.RAN)
    delivered = 0
    for src_pid, src_tid, info in late:
        where = s.restore.where(src_pid, src_tid)
        if where is not None:
            delivered += signals_mod.deliver(*where, info)
    SESSIONS.pop(id(ctx.rpc), None)
    _forget(s)
    s.let_run()
    return {"pid": pid, "running_ns": s.restore.running_ns, "signals_delivered": delivered,
            "warnings": s.restore.warnings[before:], "resume_ms": resume_ms}


async def dest_signal(ctx: CallContext, *, signals: list[Any]) -> dict[str, Any]:
    """Deliver signals sent to a moved job at its source after GO, before the source was
    ended: ``[pid, tid, siginfo]`` with pids (and tids) as they are here."""
    delivered = 0
    for pid, tid, info in signals_mod.check(signals):
        delivered += await trio.to_thread.run_sync(signals_mod.deliver, pid, tid, info)
    return {"delivered": delivered}


DEPUTIES: list[subprocess.Popen[bytes]] = []


def _start_deputy(name: str, key: bytes, address: str, lost: str, timeout: float, connect_timeout: float,
                  relay: list[tuple[int, str]]) -> tuple[subprocess.Popen[bytes], socket.socket, int]:
    """The deputy (``agent.deputy``), in a session of its own, listening; its process, our end
    of its control socket (the restored process's pidfd goes there), and its port."""
    log = open_log("deputy", name)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.deputy", "--control-fd", str(theirs.fileno()), "--address", address,
             "--lost", lost, "--timeout", repr(timeout), "--connect-timeout", repr(connect_timeout),
             *[f"--relay={fd}={path}" for fd, path in relay]],
            stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(theirs.fileno(),), start_new_session=True,
            close_fds=True)
    finally:
        theirs.close()
        os.close(log)
    assert proc.stdin is not None
    proc.stdin.write(key)
    proc.stdin.close()
    line = b""
    while not line.endswith(b"\n") and len(line) < 16:
        chunk = ours.recv(16 - len(line))
        if not chunk:
            break
        line += chunk
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        ours.close()
        raise RestoreError(f"the stand-in's deputy did not start (see {log_path('deputy', name)})")
    return proc, ours, int(line)


async def dest_deputy(ctx: CallContext, *, key: bytes, address: str, lost: str = "exit",
                      timeout: float = 30.0, relay: list[list[Any]] | None = None) -> dict[str, Any]:
    """In preflight: start the deputy (``agent.deputy``) of the process about to be restored,
    listening on ``address`` for the stand-in's keeper under ``key``; ``dest_restore`` hands
    it the process. Ended with the session on a rollback; after GO it outlives this agent.
    ``relay`` ([fd, path] pairs): FIFOs the deputy makes and reads, which the process's relayed
    fds (redirected there) write into. Returns its port, pid and log."""
    s = _session(ctx)
    if s.machine.state not in (DestState.CHECKED, DestState.RECEIVING):
        raise RestoreError("the deputy is started in preflight, before the process is restored")
    if s.deputy is not None:
        raise ProtocolError("this migration has a deputy already")
    if not isinstance(key, bytes) or len(key) != 32 or not 0 < timeout <= 3600:
        raise ProtocolError("dest_deputy: a 32-byte key and a timeout in (0, 3600] s")
    try:
        lost = str(parse_lost(lost))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    pairs: list[tuple[int, str]] = []
    for fd, path in relay or []:
        if type(fd) is not int or not 0 <= fd <= MAX_FD or not isinstance(path, str) or \
                os.path.dirname(os.path.dirname(path)) != RELAY_DIR or "\0" in path:
            raise ProtocolError(f"dest_deputy: a relayed fd {fd!r} to {path!r}")
        pairs.append((fd, path))
    name = s.token[:16]
    proc, control, port = await trio.to_thread.run_sync(
        lambda: _start_deputy(name, key, address, lost, timeout, max(120.0, 4 * timeout), pairs))
    s.deputy, s.deputy_control = proc, control
    return {"port": port, "deputy_pid": proc.pid, "log": log_path("deputy", name)}


def _hand_to_deputy(s: DestSession) -> None:
    """The restored root (stopped: it is the one we made), to the deputy: its pid and a pidfd."""
    if s.deputy_control is None:
        return
    pid = s.restore.root.pid
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(s.deputy_control, [struct.pack("<i", pid)], [pidfd])
    except OSError as exc:
        raise RestoreError(f"the stand-in's deputy is gone ({exc.strerror})") from None
    finally:
        os.close(pidfd)


async def dest_abort(ctx: CallContext) -> dict[str, Any]:
    """The rollback: the copy is destroyed (refused once it was told to go)."""
    s = SESSIONS.get(id(ctx.rpc))
    if s is not None:
        s.machine.check(DestEvent.ABORT)
        SESSIONS.pop(id(ctx.rpc), None)
        _forget(s)
        await s.inflight.stop()
        await trio.to_thread.run_sync(s.abort)
    return {}


def close_sessions(rpc: object, failure: Failure = Failure.PEER_DIED) -> None:
    """The connection ended (``failure``: closed, or silent past its link timeout): a copy not
    yet told to go is destroyed, one told to go runs on."""
    s = SESSIONS.pop(id(rpc), None)
    if s is not None:
        _forget(s)
        try:
            s.settle(failure)
        except MigrationError:
            pass


METHODS = {"dest_check": dest_check, "dest_receive": dest_receive, "dest_restore": dest_restore,
           "dest_deputy": dest_deputy, "dest_go": dest_go, "dest_abort": dest_abort,
           "dest_signal": dest_signal}
