"""A live migration: the orchestrator that drives both agents through the phases.

    PREFLIGHT  source_open (hold the pid, choose a tracker, describe files/CPU/vDSO),
               dest_check (refuse what cannot work), clock comparison
    PRECOPY    source_precopy's stream relayed into dest_receive while the process runs
    FREEZE     source_freeze: every thread stopped, the last delta and the state relayed
    RESTORE    dest_restore: the process rebuilt, held stopped (READY)
    COMMIT_ASKED source_commit_pending: losing the source agent from now on stops the source;
               meanwhile the destination must answer (a keepalive), so that its death is seen here.
               Asked while the destination restores (COMMIT_ASKED_RESTORING, then READY) when
               the freeze's answer allows it: the round trip is then out of the downtime
    SOURCE_COMMITTED  it did; GO not yet written: a destination connection that ended
               meanwhile, or a Ctrl-C, still rolls back (the source is released, and runs on)
    --------   the point of no return: dest_go handed to the destination's link
    GO_SENT    dest_go: the process runs on the destination (RUNNING)
    COMMIT     source_kill, or with --stand-in source_stand_in (the deputy, dest_deputy, was
               started in preflight and given the process by dest_restore)
    ROLLBACK   any failure before GO: dest_abort, source_release (the source runs on)

What a failure does in each phase is the protocol core's (``migrate.phases``): before GO is
written, roll back; once it is, a lost answer never resumes the source: it is left stopped and
the report says how to settle it (``kcr-migrate resolve``); once the copy runs, a warning.
Agents that stop hearing from us settle on their own (``keepalive``). The ``Migration`` owns
its nursery; cleanup runs shielded with deadlines.
"""
from __future__ import annotations

import math
import secrets
import time
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Callable

import trio

from agent.homelink import RELAY_DIR
from agent.signals import names as late_names
from agent.urgency import short_freeze
from migrate.api import (
    DataChannelChosen,
    Event,
    Finished,
    MigrationOptions,
    MigrationReport,
    PhaseChanged,
    PreflightDone,
    RoundDone,
    WarningRaised,
)
from migrate.fshooks import HookContext, parse_hook
from migrate.phases import ASKED_TO_COMMIT, Action, Failure, Phase, PhaseMachine
from migrate.phases import Event as PhaseEvent
from transport._nursery import leaves, service_nursery
from transport.errors import (
    Cancelled,
    ChannelClosed,
    MigrationError,
    PeerGone,
    ProcessExited,
    ProtocolError,
    TransportError,
    TransportTimeout,
)
from transport.local import open_local_agent
from transport.protocol import AGENT_COMMAND
from transport.records import Record
from transport.rpc import Call, RpcPeer
from transport.schema import PAGE_SIZE
from transport.ssh import open_ssh_agent
from transport.stream import RawBatch
from transport.tcp import new_key

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")
CLEANUP_DEADLINE = 30.0
AUTO_CONNECT_TIMEOUT_S = 3.0     # --data-channel auto: longer than a LAN's connect, then relay
TCP_CONNECT_TIMEOUT_S = 10.0
MiB = 1 << 20



class MigrationUnsettled(MigrationError):
    """Past the point of no return, the destination did not confirm it runs the process."""

    code = "unsettled"


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


def open_agent(host: str, *, ssh_config: str | None = None, command: str | None = None,
               **rpc_options: Any) -> Any:
    """The one way to reach a host's agent: started locally for localhost, else over SSH
    (``command`` on the host, ``ssh_config`` as ssh -F). An async context manager yielding the
    ``RpcPeer``."""
    if is_local(host):
        return open_local_agent(echo_stderr=True, **rpc_options)
    return open_ssh_agent(host, ssh_config=ssh_config, command=command or AGENT_COMMAND, **rpc_options)


class Migration:
    """One migration of ``pid`` from ``source`` to ``dest`` (host names; "localhost" needs no SSH).

    ``frozen_slot``: entered once pre-copy has ended, before the process is frozen, and left
    once it runs again (on the destination, or back on the source): a caller running several
    migrations at once (the rebalance executor) lets one at a time be frozen on a host, so that
    their final rounds and restores do not share its CPUs and link, which stretches each freeze.
    """

    def __init__(self, pid: int, source: str, dest: str, options: MigrationOptions | None = None, *,
                 on_event: Callable[[Event], None] | None = None,
                 frozen_slot: Callable[[], AbstractAsyncContextManager[Any]] | None = None) -> None:
        self.pid = pid
        self.source = source
        self.dest = dest
        self.options = options or MigrationOptions()
        self.machine = PhaseMachine()
        self.report = MigrationReport(pid, source, dest)
        self.agents: dict[str, dict[str, Any]] = {}     # "source"/"dest" -> the agent's info
        self.dest_urgent = False        # the destination's part of a short freeze may run at real-time priority
        self._on_event = on_event
        self._send, self._receive = trio.open_memory_channel[Event](math.inf)
        self._scope: trio.CancelScope | None = None
        self._cancel_requested = False
        self._phase_t = time.monotonic()
        self._frozen_slot = frozen_slot
        self._frozen = AsyncExitStack()      # holds the slot while the process is frozen

    # --- the caller's side -------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, ending with ``Finished``."""
        async with self._receive:
            async for ev in self._receive:
                yield ev
                if isinstance(ev, Finished):
                    return

    def cancel(self) -> None:
        """Stop: before GO this rolls back (the source runs on); after, it finishes cleanly."""
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> MigrationReport:
        t0 = time.monotonic()
        try:
            with trio.CancelScope() as connecting:
                self._cancel_within(connecting)
                await self._run()
            if self._cancel_requested and self.report.state in ("preflight", "rolled-back"):
                raise Cancelled("interrupted: the migration was rolled back and the process runs on the source",
                                pid=self.pid, phase=self.machine.phase.value)
        finally:
            self._scope = None
            self.report.total_ms = (time.monotonic() - t0) * 1000
            self._emit(Finished(self.report))
            self._send.close()
        return self.report

    def _cancel_within(self, scope: trio.CancelScope) -> None:
        """``cancel()`` cancels ``scope`` from now on (at once if it was asked for already)."""
        self._scope = scope
        if self._cancel_requested:
            scope.cancel()

    # --- plumbing ----------------------------------------------------------------------------

    def _emit(self, ev: Event) -> None:
        try:
            self._send.send_nowait(ev)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        if self._on_event is not None:
            self._on_event(ev)

    def _advance(self, event: PhaseEvent) -> None:
        before = self.machine.phase
        now = time.monotonic()
        self.report.phase_ms[before.value] = self.report.phase_ms.get(before.value, 0.0) + (now - self._phase_t) * 1000
        self._phase_t = now
        after = self.machine.handle(event)
        if after is not before:
            self._emit(PhaseChanged(after.value))

    def _warn(self, message: str) -> None:
        self.report.warnings.append(message)
        self._emit(WarningRaised(message))

    @asynccontextmanager
    async def _connect(self, host: str, role: str) -> AsyncIterator[RpcPeer]:
        o = self.options
        rpc_options: dict[str, Any] = {"level": o.compress_level, "call_timeout": o.call_timeout_s}
        try:
            async with open_agent(host, ssh_config=o.ssh_config, command=o.agent_command, **rpc_options) as rpc:
                self.agents[role] = await rpc.call("info")
                yield rpc
        except MigrationError as exc:
            exc.host = exc.host or host
            exc.phase = exc.phase or self.machine.phase.value
            raise

    async def _keepalive(self, peers: list[RpcPeer], hosts: list[str]) -> None:
        """Tell the agents we are alive, and notice a link that stops answering without closing
        (a cut cable keeps TCP silent): that fails the migration, which then rolls back."""
        timeout = self.options.link_timeout_s
        while True:
            for peer, host in zip(peers, hosts):
                try:
                    with trio.fail_after(timeout):
                        # ``timeout`` is the call's own; ``link_timeout`` arms the agent's watchdog
                        await peer.call("keepalive", link_timeout=timeout, timeout=timeout)
                except (trio.TooSlowError, TransportTimeout):
                    exc = PeerGone(f"{host} stopped answering for {timeout:g} s: the link is down or the "
                                   "agent is stuck", host=host)
                    peer.abandon(exc)
                    raise exc from None
                except (PeerGone, ChannelClosed):
                    pass     # a closed connection: the migration's own calls report it
            await trio.sleep(max(0.2, timeout / 4))

    async def _relay(self, call: Call, upload: Call | None) -> None:
        """Forward the source's stream to the destination: records and compressed batches as
        they are (pages are decompressed only where they are written)."""
        while (item := await call.pages.receive_raw()) is not None:
            if upload is None:
                raise ProtocolError("the source sent pages back although they go over the data channel")
            if isinstance(item, RawBatch):
                await upload.send_batch(item)
            else:
                assert isinstance(item, Record)
                await upload.send_record(item)

    async def _clocks(self, src: RpcPeer, dst: RpcPeer) -> tuple[int, int, float]:
        """(source offset, destination offset, uncertainty ms): remote minus our clock, in ns.
        Hosts booted from the same kernel instance share CLOCK_MONOTONIC exactly."""
        if self.agents["source"].get("boot_id") and \
                self.agents["source"].get("boot_id") == self.agents["dest"].get("boot_id"):
            return 0, 0, 0.0
        offsets, rtts = [], []
        for peer in (src, dst):
            best: tuple[int, int] | None = None
            for _ in range(5):
                t1 = time.monotonic_ns()
                remote = (await peer.call("clock"))["monotonic_ns"]
                t2 = time.monotonic_ns()
                if best is None or t2 - t1 < best[1]:
                    best = (remote - (t1 + t2) // 2, t2 - t1)
            assert best is not None
            offsets.append(best[0])
            rtts.append(best[1])
        return offsets[0], offsets[1], (rtts[0] + rtts[1]) / 2 / 1e6

    # --- the migration -----------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect to both agents at once (each an SSH handshake and an agent start), migrate,
        and close both. Failing to reach both reports one of them; once connected, an error
        in closing a connection does not replace the migration's own."""
        peers: dict[str, RpcPeer] = {}
        connected, leave = trio.Event(), trio.Event()
        failed = False

        async def hold(host: str, role: str) -> None:
            try:
                async with self._connect(host, role) as rpc:
                    peers[role] = rpc
                    if len(peers) == 2:
                        connected.set()
                    await leave.wait()
            except MigrationError:
                if not failed:
                    raise

        try:
            async with service_nursery() as connections:
                connections.start_soon(hold, self.source, "source")
                connections.start_soon(hold, self.dest, "dest")
                try:
                    await connected.wait()
                    await self._connected(peers["source"], peers["dest"])
                except BaseException:
                    failed = True
                    raise
                finally:
                    leave.set()
        except BaseExceptionGroup as group:
            # Past the point of no return, what the user must do next (resolve) outranks why
            # (the keepalive's "stopped answering", raised beside it).
            errors = [e for e in leaves(group) if isinstance(e, MigrationError)]
            first = next((e for e in errors if isinstance(e, MigrationUnsettled)), errors[0] if errors else None)
            if first is None:
                raise
            raise first from None

    async def _connected(self, src: RpcPeer, dst: RpcPeer) -> None:
        async with service_nursery() as nursery:
            nursery.start_soon(self._keepalive, [src, dst], [self.source, self.dest])
            try:
                # Once connected, cancel() stops the migration only: the connections stay up,
                # so the rollback reaches both agents, and then close with a goodbye.
                with trio.CancelScope() as migrating:
                    self._cancel_within(migrating)
                    async with self._frozen:
                        await self._migrate(src, dst)
            finally:
                nursery.cancel_scope.cancel()

    async def _migrate(self, src: RpcPeer, dst: RpcPeer) -> None:
        o = self.options
        r = self.report
        self.hooks = [parse_hook(h) if isinstance(h, str) else h for h in o.fs]
        self.hook_ctx = HookContext(src, dst, self.source, self.dest, o.ssh_config, o.fs_replace)
        exempt = [p for h in self.hooks for p in h.paths()]
        # --relay: the fd becomes, on the destination, the FIFO the deputy reads (a redirect there)
        relay_dir = f"{RELAY_DIR}/{secrets.token_hex(8)}"
        self.relay = {fd: f"{relay_dir}/fd{fd}" for fd in o.relay}
        summary = await src.call("source_open", pid=self.pid, tracker=o.tracker, exempt=exempt,
                                 level=o.compress_level, bandwidth_limit=o.bandwidth_limit,
                                 redirect=[[fd, path] for fd, path in sorted({**o.redirect, **self.relay}.items())],
                                 new_pid=o.new_pid)
        r.memory_bytes = int(summary["memory_bytes"])
        self.deputy_to: dict[str, Any] | None = None
        r.tracker, r.tracker_reason = str(summary["tracker"]), str(summary["tracker_reason"])
        self._emit(PreflightDone(self.pid, str(summary["comm"]), r.memory_bytes, int(summary["threads"]),
                                 r.tracker, r.tracker_reason))
        for phrase in summary.get("held_outside", [])[:5]:     # (an agent before it sends none)
            self._warn(f"{str(phrase)[:300]}: it is not moved and runs on at {self.source} (a move takes the "
                       "job's tree)")
        try:
            # Sent only where not the default, which an agent of an earlier version knows without it.
            placement: dict[str, Any] = {"affinity": o.affinity} if o.affinity != "refuse" else {}
            if o.cgroup is not None:
                placement["cgroup"] = o.cgroup
            checked = await dst.call("dest_check", summary=summary, new_pid=o.new_pid, **placement)
            self.dest_urgent = bool(checked.get("urgent"))     # (an agent of an earlier version says nothing)
            for warning in checked.get("warnings", []):
                self._warn(str(warning))
            if checked.get("very"):       # the very files both see: a write lock on one is waited out
                await src.call("source_very_files", paths=list(checked["very"]), host=self.dest)
            self.data_to = await self._data_channel(src, dst, str(checked["session"]))
            stand_in_address = self._stand_in_address(summary)
            if self.relay and not stand_in_address:
                raise TransportError("--relay sends output back through a stand-in, and none will be left "
                                     f"(pid {self.pid}'s parent is init): migrate without --relay", pid=self.pid)
            if stand_in_address and not o.dry_run:
                key = new_key()
                deputy = await dst.call("dest_deputy", key=key, address=stand_in_address, lost=o.stand_in_lost,
                                        timeout=o.link_timeout_s,
                                        relay=[[fd, path] for fd, path in sorted(self.relay.items())])
                self.deputy_to = {"address": stand_in_address, "port": int(deputy["port"]), "key": key,
                                  "lost": o.stand_in_lost, "timeout": o.link_timeout_s, "where": "",
                                  "relay": sorted(self.relay)}
                r.stand_in = {"deputy_pid": int(deputy["deputy_pid"]), "deputy_log": str(deputy["log"]),
                              "deputy_address": f"{stand_in_address}:{deputy['port']}"}
            for hook in self.hooks:
                await hook.preflight(self.hook_ctx)
            src_off, dst_off, uncertainty = await self._clocks(src, dst)
            if o.dry_run:
                await src.call("source_release")
                r.state = "dry-run"
                r.message = "preflight passed; nothing was moved"
                return
            self._advance(PhaseEvent.PREFLIGHT_OK)
            committed: dict[str, Any] = {}
            beside = False          # the source was asked to commit while the destination restores
            async with AsyncExitStack() as stack:
                # Through us (ssh, local): relayed into the destination's upload. Over tcp the
                # source sends straight to the destination and nothing passes here.
                upload = None if self.data_to else await stack.enter_async_context(
                    dst.open_call("dest_receive", upload=True))
                restored: dict[str, Any] = {}
                async with service_nursery() as restoring:
                    early = (restoring, restored) if o.precopy and not self.hooks else None
                    freeze = await self._copy(src, dst, upload, early)
                    if early is not None and freeze.get("commit_beside_restore"):
                        beside = True
                        self._ask_commit(restoring, src, dst, committed, answer_due=not restored)
                if isinstance(restored.get("error"), MigrationError):
                    raise restored["error"]
                for hook, stats in zip(self.hooks, r.fs):
                    stats["final"] = await hook.final_pass(self.hook_ctx)   # the process is frozen
                for hook in self.hooks:
                    await hook.before_resume(self.hook_ctx)
                if early is None:
                    async with service_nursery() as restoring:
                        if freeze.get("commit_beside_restore"):
                            beside = True
                            self._ask_commit(restoring, src, dst, committed, answer_due=True)
                        restored = await dst.call("dest_restore")
                if upload is not None:
                    await upload.result()     # done: dest_restore waited for it
            r.processes = list(restored.get("processes", []))
            # Where the destination's part of the freeze went (an agent of an earlier version says nothing).
            r.final_round.update({f"dest_{k}": float(v) for k, v in dict(restored.get("timing", {})).items()})
            for w in restored.get("warnings", []):
                self._warn(str(w))
            self._advance(PhaseEvent.READY)
            if self.deputy_to is not None:
                self.deputy_to["where"] = f"pid {restored['pid']} on {self.dest}"
            if not beside:
                async with service_nursery() as asking:
                    self._ask_commit(asking, src, dst, committed, answer_due=False)
            late = list(committed.get("signals", []))
            self._advance(PhaseEvent.COMMITTED)
            # GO is not written yet: a destination connection that ended meanwhile (its agent
            # died, the keepalive gave up on its link) or a Ctrl-C still rolls back, and the
            # source runs on. One pass lets the readers report what has come in.
            await trio.lowlevel.checkpoint()
            if dst.error is not None:
                raise dst.error
            if dst.closed.is_set():
                raise ChannelClosed(f"the connection to {self.dest} is closed")
        except BaseException as exc:
            await self._failed(src, dst, exc)
            raise
        # ---- the point of no return: from here the source is never resumed by us alone ----
        with trio.CancelScope(shield=True):
            # No wait between that check and handing GO to the link (``dest_go`` queues it
            # before its first wait): from here GO may arrive, whatever fails.
            self._advance(PhaseEvent.GO)
            written = False
            try:
                with trio.fail_after(max(o.link_timeout_s, 5.0)):
                    async with dst.open_call("dest_go", signals=late) as call:
                        written = True
                        go = await call.result()
            except (MigrationError, trio.TooSlowError) as exc:
                if not written and isinstance(exc, MigrationError):
                    # The call failed before GO was written, for good (its connection had
                    # ended, or its writer failed on GO or before it): GO cannot arrive. A
                    # timeout here is not that: GO stays queued and may still go out.
                    self._advance(PhaseEvent.GO_REFUSED)
                await self._failed(src, dst, exc)     # unsettled: raises MigrationUnsettled
                raise                                 # rolled back: GO never left
            r.new_pid = int(go["pid"])
            if "resume_ms" in go:
                r.final_round["dest_resume_ms"] = float(go["resume_ms"])
            for w in go.get("warnings", []):
                self._warn(str(w))
            self._note_late(late, int(go.get("signals_delivered", 0)))
            first_ns = int(freeze["first_interrupt_ns"]) - src_off
            running_ns = int(go["running_ns"]) - dst_off
            r.downtime_ms = (running_ns - first_ns) / 1e6 + uncertainty
            r.downtime_uncertainty_ms = uncertainty
            r.frozen_at, r.running_at = first_ns / 1e9, running_ns / 1e9
            await self._frozen.aclose()      # it runs: another migration may freeze
            self._advance(PhaseEvent.RUNNING)
            if self.deputy_to is not None:
                await self._stand_in(src, dst)
            else:
                await self._kill_source(src, dst)
            r.state = "done"
            for hook in self.hooks:
                try:
                    with trio.fail_after(CLEANUP_DEADLINE):
                        await hook.commit(self.hook_ctx)
                except (MigrationError, trio.TooSlowError) as exc:
                    self._warn(f"filesystem hook {hook.name}: cleaning up after the migration failed: {exc}")

    def _ask_commit(self, nursery: trio.Nursery, src: RpcPeer, dst: RpcPeer, committed: dict[str, Any], *,
                    answer_due: bool) -> None:
        """Ask the source to commit (``source_commit_pending``: its answer goes in ``committed``).
        GO goes only to a destination that answered since the source was asked, so one that
        dies meanwhile is seen now (roll back), not once GO is on its way (unsettled): beside
        the commit, the destination is asked to answer (a keepalive) unless ``answer_due`` (its
        restore's answer is still to come). Asked while the destination restores (the freeze's
        answer allows it: ``migrate.phases``), or once it is ready."""
        if self.machine.phase is Phase.RESTORE:
            self._advance(PhaseEvent.ASK_COMMIT)

        async def commit() -> None:
            committed.update(await src.call("source_commit_pending"))
        nursery.start_soon(commit)
        if not answer_due:
            timeout = self.options.link_timeout_s
            nursery.start_soon(partial(dst.call, "keepalive", link_timeout=timeout, timeout=timeout))

    def _note_late(self, signals: list[Any], delivered: int) -> None:
        """Signals sent to the job at the source after its state was read, delivered on the
        destination (``agent.signals``): in the report, and a warning for any not delivered
        (the process they were for had ended there)."""
        if not signals:
            return
        self.report.late_signals += [f"{late_names([s])} to pid {int(s[0])}" for s in signals]
        if delivered < len(signals):
            self._warn(f"{len(signals) - delivered} of the signals sent to the job on {self.source} during the "
                       f"move ({late_names(signals)}) found no process to deliver them to on {self.dest}")

    async def _forward_late(self, dst: RpcPeer, signals: list[Any]) -> None:
        """Signals that reached the source between GO and its end: to the moved job."""
        if not signals:
            return
        if self.options.new_pid:      # one process, a new pid; its threads' tids are new too
            signals = [[self.report.new_pid if int(p) == self.pid else int(p), 0, info] for p, _, info in signals]
        try:
            with trio.fail_after(CLEANUP_DEADLINE):
                got = await dst.call("dest_signal", signals=signals)
        except (MigrationError, trio.TooSlowError) as exc:
            self._warn(f"signals sent to the job on {self.source} as the move ended ({late_names(signals)}) "
                       f"could not be delivered on {self.dest}: {exc}")
            return
        self._note_late(signals, int(got.get("delivered", 0)))

    async def _kill_source(self, src: RpcPeer, dst: RpcPeer) -> None:
        r = self.report
        try:
            with trio.fail_after(CLEANUP_DEADLINE):
                got = await src.call("source_kill")
        except (MigrationError, trio.TooSlowError) as exc:
            self._warn(f"the process runs on {self.dest} as pid {r.new_pid}, but ending the source "
                       f"failed ({exc}); it is stopped: end it with `kcr-migrate resolve "
                       f"{self.pid}@{self.source} --kill`")
            await self._failed(src, dst, exc)
        else:
            self._advance(PhaseEvent.SOURCE_KILLED)
            await self._forward_late(dst, list(got.get("signals", [])))

    async def _stand_in(self, src: RpcPeer, dst: RpcPeer) -> None:
        """In place of ending the source: its root becomes the stand-in (``agent.standin``),
        linked to the deputy started before GO. If that fails the source was ended instead."""
        r = self.report
        try:
            with trio.fail_after(CLEANUP_DEADLINE):
                got = await src.call("source_stand_in", to=self.deputy_to)
        except (MigrationError, trio.TooSlowError) as exc:
            self._warn(f"the process runs on {self.dest} as pid {r.new_pid}, but no stand-in was left on "
                       f"{self.source}: {exc}")
            await self._failed(src, dst, exc)
            return
        r.stand_in.update({"pid": int(got["pid"]), "keeper_pid": int(got["keeper_pid"]),
                           "vm_rss_kb": int(got["vm_rss_kb"]), "keeper_log": str(got["log"])})
        self._advance(PhaseEvent.STOOD_IN)
        await self._forward_late(dst, list(got.get("signals", [])))

    def _stand_in_address(self, summary: dict[str, Any]) -> str:
        """With ``stand_in``: the destination's address as the source reaches it, for the
        stand-in's link; "" for no stand-in (off, or ``auto`` and the parent is its pid
        namespace's init or outside it)."""
        o = self.options
        if not o.stand_in:
            return ""
        processes = summary.get("processes") or [{}]
        ppid = int(processes[0].get("ppid", 0))
        if o.stand_in == "auto" and ppid in (0, 1):
            return ""
        address = self._data_address()
        if not address:
            problem = f"cannot tell which address of {self.dest} {self.source} can connect to, as the stand-in's link must"
        elif self.data_to is None and o.data_channel == "auto":
            # The source could not open the data channel to that address: nor could the keeper.
            problem = (f"{self.source} cannot connect to {self.dest} (so the data channel is relayed over ssh), "
                       "as the stand-in's link must")
        else:
            return address
        if o.stand_in == "auto":
            self._warn(f"{problem}: no stand-in will be left")
            return ""
        raise TransportError(f"{problem}: open the way, or migrate without --stand-in", pid=self.pid)

    def _data_address(self) -> str:
        """The destination's address as the source host can reach it; "" if unknown."""
        if is_local(self.dest):
            if is_local(self.source):
                return "127.0.0.1"
            return str(self.agents["source"].get("ssh_client_address") or "")    # this host, seen from there
        return str(self.agents["dest"].get("ssh_server_address") or "")

    async def _data_channel(self, src: RpcPeer, dst: RpcPeer, session: str) -> dict[str, Any] | None:
        """Open the direct data channel (``tcp``, or ``auto`` where it works): the destination
        listens on the address the source can reach it by, under a fresh key sent only over
        SSH, and the source connects now, in preflight. None: pages are relayed through us."""
        o = self.options
        r = self.report
        if o.data_channel == "ssh":
            r.data_channel, r.data_channel_note = "ssh", "relayed through kcr-migrate (--data-channel ssh)"
            self._emit(DataChannelChosen("ssh", r.data_channel_note))
            return None
        address = self._data_address()
        try:
            if not address:
                raise TransportError(f"cannot tell which address of {self.dest} {self.source} can "
                                     "connect to for the data channel")
            key = new_key()
            listening = await dst.call("data_listen", key=key, address=address, port=0)
            to = {"kind": "tcp", "address": address, "port": int(listening["port"]), "key": key, "session": session}
            timeout = AUTO_CONNECT_TIMEOUT_S if o.data_channel == "auto" else TCP_CONNECT_TIMEOUT_S
            opened = await src.call("source_connect", to=to, timeout=timeout)
            if not opened["connected"]:
                raise TransportError(f"{self.source} cannot open the data channel to {self.dest}: "
                                     f"{opened['error']}")
        except (PeerGone, ChannelClosed, TransportTimeout):
            raise                        # an agent's control connection failed: no channel helps
        except TransportError as exc:    # no address, no listener, or no connection to it
            if o.data_channel == "tcp":
                exc.message = f"{exc.message}; or use --data-channel ssh to relay the pages over SSH"
                raise
            r.data_channel = "ssh"
            r.data_channel_note = f"relayed over ssh: {exc.message}"
            self._emit(DataChannelChosen("ssh", r.data_channel_note))
            return None
        r.data_channel = "tcp"
        r.data_channel_note = f"straight from the source to {address}:{to['port']} ({opened['cipher']})"
        self._emit(DataChannelChosen("tcp", r.data_channel_note))
        return to

    async def _copy(self, src: RpcPeer, dst: RpcPeer, upload: Call | None,
                    restore: tuple[trio.Nursery, dict[str, Any]] | None = None) -> dict[str, Any]:
        """PRECOPY and FREEZE/FINAL: relay the source's stream into the destination's ``upload``
        (ssh, local; None when the source sends over the tcp data channel). The upload is ended
        here; the destination's answer to it is awaited after ``dest_restore``, which waits for it
        there: one round trip less inside the downtime. ``restore`` (a nursery, a dict for its
        answer): ask ``dest_restore`` as the freeze starts, in that nursery, so that the
        destination restores as soon as the stream has ended there, not once the source's
        answer has come through us (with pre-copy, so the freeze is short; and no filesystem hook
        has to run in between)."""
        o = self.options
        r = self.report

        def on_round(fields: dict[str, Any]) -> None:
            if fields.get("event") == "round":
                stats = {k: v for k, v in fields.items() if k != "event"}
                r.per_round.append(stats)
                r.rounds = len(r.per_round)
                self._emit(RoundDone(int(stats["round"]), stats))

        r.fs = [{"hook": h.name, "paths": h.paths(), "passes": []} for h in self.hooks]
        to = self.data_to
        if o.precopy:
            async with service_nursery() as nursery:
                memory_done = trio.Event()
                if self.hooks:
                    nursery.start_soon(self._fs_passes, memory_done)
                async with src.open_call("source_precopy", policy=o.policy_args(), to=to,
                                         on_progress=on_round) as call:
                    await self._relay(call, upload)
                    pre = await call.result()
                memory_done.set()
            r.stop_reason = str(pre["stop_reason"])
            pending = int(pre.get("pages_pending", 0))
            self._warn_if_not_converged(pending)
            if upload is not None:
                # Freeze only once the destination has applied every pre-copy page: pages
                # still queued between the hosts would otherwise land inside the downtime.
                await dst.fs.flush()
                await dst.flow.wait_drained()
        else:
            r.stop_reason = "stop-and-copy"
            pending = -1
        self._advance(PhaseEvent.PRECOPY_DONE)
        if self._frozen_slot is not None:
            # Waiting here, the process runs: what it writes meanwhile goes in the final delta.
            await self._frozen.enter_async_context(self._frozen_slot())
        if restore is not None:
            nursery, restored = restore
            # A short freeze: the destination's part runs at real-time priority (``agent.urgency``).
            urgent: dict[str, Any] = {"urgent": True} if self.dest_urgent and short_freeze(pending) else {}

            async def dest_restore() -> None:
                try:
                    restored.update(await dst.call("dest_restore", **urgent))
                except MigrationError as exc:
                    # Raised once the freeze has answered: a stream that broke fails both,
                    # and the source's error says why.
                    restored["error"] = exc
            nursery.start_soon(dest_restore)
        async with src.open_call("source_freeze", to=to) as call:
            self._advance(PhaseEvent.FROZEN)
            await self._relay(call, upload)
            freeze = await call.result()
        self._advance(PhaseEvent.STATE_SENT)
        if upload is not None:
            upload.end_pages()
        final = dict(freeze["final"])
        r.final_round = final
        r.frozen_bytes_raw = int(final["bytes_raw"])
        r.frozen_bytes_on_wire = int(final["bytes_on_wire"])
        r.bytes_raw = sum(int(x["bytes_raw"]) for x in r.per_round) + r.frozen_bytes_raw
        r.bytes_on_wire = sum(int(x["bytes_on_wire"]) for x in r.per_round) + r.frozen_bytes_on_wire
        return freeze

    def _warn_if_not_converged(self, pending_pages: int) -> None:
        """Pre-copy gave up: say why the freeze will be long, and what would help."""
        r = self.report
        if r.stop_reason not in ("dirty-growing", "max-rounds", "max-bytes") or not r.per_round:
            return
        last = r.per_round[-1]
        sent_mib = sum(float(x["bytes_raw"]) for x in r.per_round) / MiB
        secs = sum(float(x["send_ms"]) for x in r.per_round) / 1000
        rate = f", about {sent_mib / secs:.0f} MiB/s" if secs > 0 else ""
        helps = ("a higher --bandwidth" if self.options.bandwidth_limit else
                 "a faster data channel (--data-channel tcp)" if self.report.data_channel == "ssh" else "a faster link")
        self._warn(f"pre-copy did not converge ({r.stop_reason}): the process dirties "
                   f"{float(last['dirty_rate_mib_s']):.0f} MiB/s, close to what the link carries{rate}; "
                   f"{pending_pages * PAGE_SIZE / MiB:.0f} MiB remain to send while it is frozen. {helps.capitalize()} "
                   "or a quieter moment shortens the freeze")

    async def _fs_passes(self, memory_done: trio.Event) -> None:
        """Filesystem passes while the process runs, until the memory pre-copy is done, and
        one more after it so the final pass (inside the downtime) has little left."""
        round = 0
        while True:
            last = memory_done.is_set()
            for hook, stats in zip(self.hooks, self.report.fs):
                stats["passes"].append(await hook.precopy_pass(self.hook_ctx, round))
            round += 1
            if last:
                return
            with trio.move_on_after(0.5):
                await memory_done.wait()

    async def _failed(self, src: RpcPeer, dst: RpcPeer, exc: BaseException) -> None:
        """Carry out what the protocol core says the current phase does about this failure:
        roll back, keep the source stopped (unsettled: raises), or run on (a warning, said by
        the caller)."""
        if isinstance(exc, (trio.Cancelled, KeyboardInterrupt, Cancelled)):
            failure = Failure.CANCELLED
        elif isinstance(exc, (PeerGone, ChannelClosed)):
            failure = Failure.PEER_DIED
        elif isinstance(exc, (TransportTimeout, trio.TooSlowError)):
            failure = Failure.LINK_LOST
        else:
            failure = Failure.LOCAL_ERROR
        failed_in = self.machine.phase
        action = self.machine.action(failure)
        event = self.machine.failure_event(failure)
        if event is not None:
            self._advance(event)
        if action is Action.ROLL_BACK:
            # asked to commit (or committed): GO was never written, but the source may be stopped
            await self._rollback(src, dst, exc, asked_commit=failed_in in ASKED_TO_COMMIT)
        elif action is Action.KEEP_STOPPED:
            await self._unsettled(src, exc)

    async def _rollback(self, src: RpcPeer, dst: RpcPeer, exc: BaseException, *, asked_commit: bool) -> None:
        """Before GO: destroy the destination's copy, let the source run on. If the source was
        asked to commit and cannot be told to run on, it is left stopped by its agent: raises
        MigrationUnsettled (settled by ``resolve --resume``: GO was never written)."""
        unreached = []
        with trio.CancelScope(shield=True):
            for hook in getattr(self, "hooks", []):
                try:
                    with trio.fail_after(min(CLEANUP_DEADLINE, self.options.link_timeout_s * 2)):
                        await hook.rollback(self.hook_ctx)
                except (MigrationError, trio.TooSlowError) as hook_exc:
                    self._warn(f"filesystem hook {hook.name}: discarding the destination's copy failed: "
                               f"{hook_exc}")
            released = True      # the source: told to run on (or, not marked, its agent lets it)
            ended = False        # ... but it had ended meanwhile (the job finished)
            for peer, method, who in ((dst, "dest_abort", self.dest), (src, "source_release", self.source)):
                try:
                    with trio.fail_after(min(CLEANUP_DEADLINE, self.options.link_timeout_s)):
                        answer = await peer.call(method)
                    if peer is src:
                        ended = bool(answer.get("root_exited", False))
                except (MigrationError, trio.TooSlowError):
                    unreached.append(who)
                    if peer is src:         # by role: both hosts may be one
                        released = False
        r = self.report
        failed_in = self.machine.history[-1][0].value if self.machine.history else Phase.PREFLIGHT.value
        if isinstance(exc, MigrationError):
            exc.phase = exc.phase or failed_in
            exc.pid = exc.pid if exc.pid is not None else self.pid
        if self.machine.phase is Phase.ROLLBACK:
            self._advance(PhaseEvent.ROLLED_BACK)
        if asked_commit and not released:
            # Marked to stop and not told otherwise: its agent keeps it stopped. GO was never
            # written, so it never ran on the destination: unsettled, settled by --resume.
            where = f"{self.pid}@{self.source}"
            r.state = "unsettled"
            r.message = (f"rolled back before GO was sent ({exc}), but the agent on {self.source} could not be "
                         f"reached after the source was asked to commit: pid {self.pid} there is stopped, or "
                         f"being stopped by its agent (it never ran on {self.dest}); let it go on with "
                         f"`kcr-migrate resolve {where} --resume`")
            raise MigrationUnsettled(r.message, phase=failed_in, pid=self.pid, host=None) from None
        r.state = "rolled-back"
        r.message = f"rolled back: pid {self.pid} runs on at {self.source}"
        if ended and isinstance(exc, MigrationError) and not isinstance(exc, ProcessExited):
            # What failed is likely the job ending (a file it renamed as it finished, a
            # process it reaped): that is what the user needs to hear.
            r.message = f"rolled back: pid {self.pid} has exited on {self.source} meanwhile"
            exc.message = (f"pid {self.pid} exited while the move was prepared: there is nothing left to move "
                           f"(what failed meanwhile: {exc})")
            exc.host = self.source
            exc.args = (exc.message,)
        if unreached:
            self._warn(f"could not reach the agent on {', '.join(unreached)} to roll back; it settles on its own "
                       f"within {self.options.link_timeout_s:g} s (the source process runs on)")
        if asked_commit and isinstance(exc, MigrationError):
            # the source had been marked to stop: say what became of it
            exc.message = f"{exc.message}; GO was never sent: {r.message}"
            exc.args = (exc.message,)

    async def _unsettled(self, src: RpcPeer, exc: BaseException) -> None:
        """GO was sent but not confirmed: keep the source stopped; say how to settle it."""
        held = True
        try:
            with trio.fail_after(CLEANUP_DEADLINE):
                await src.call("source_hold")
        except (MigrationError, trio.TooSlowError):
            held = False    # its agent stops it on its own once it notices
        r = self.report
        r.state = "unsettled"
        where = f"{self.pid}@{self.source}"
        r.message = (
            f"the destination {self.dest} did not confirm it runs the process ({exc}); the source pid "
            f"{self.pid} on {self.source} is {'stopped' if held else 'being stopped by its agent'}. Check "
            f"{self.dest}: if the process runs there, `kcr-migrate resolve {where} --kill`; if not, "
            f"`kcr-migrate resolve {where} --resume`")
        raise MigrationUnsettled(r.message, phase="go", pid=self.pid, host=None)


async def migrate(pid: int, source: str, dest: str, options: MigrationOptions | None = None, *,
                  on_event: Callable[[Event], None] | None = None) -> MigrationReport:
    """Migrate ``pid`` from ``source`` to ``dest`` (under trio); raises a MigrationError on failure."""
    return await Migration(pid, source, dest, options, on_event=on_event).run()


def migrate_blocking(pid: int, source: str, dest: str, options: MigrationOptions | None = None, *,
                     on_event: Callable[[Event], None] | None = None) -> MigrationReport:
    """``migrate`` for callers that do not run trio: runs its own event loop in this thread."""
    return trio.run(lambda: migrate(pid, source, dest, options, on_event=on_event))


__all__ = ["Migration", "MigrationUnsettled", "migrate", "migrate_blocking", "is_local", "open_agent"]
