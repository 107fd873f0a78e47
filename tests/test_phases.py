"""The protocol core (``migrate.phases``), without processes or sockets: every role's state
under every failure, and the four parties walked together through lost, repeated and
reordered messages and a party killed at each step."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable

import pytest

from migrate.phases import (
    BEFORE_POINT_OF_NO_RETURN,
    DESTINATION,
    HOLDER,
    ORCHESTRATOR,
    PROTOCOLS,
    SETTLE,
    Action,
    DestEvent,
    DestState,
    Event,
    Failure,
    HolderEvent,
    HolderState,
    IllegalTransition,
    Machine,
    Phase,
    PhaseMachine,
    Protocol,
    guarded,
)

HAPPY = [Event.PREFLIGHT_OK, Event.PRECOPY_DONE, Event.FROZEN, Event.STATE_SENT, Event.READY, Event.COMMITTED,
         Event.GO, Event.RUNNING, Event.SOURCE_KILLED]
# The source asked to commit while the destination restores
HAPPY_BESIDE = HAPPY[:4] + [Event.ASK_COMMIT] + HAPPY[4:]


def test_the_happy_path() -> None:
    m = PhaseMachine()
    phases = [m.handle(e) for e in HAPPY]
    assert phases == [Phase.PRECOPY, Phase.FREEZE, Phase.FINAL, Phase.RESTORE, Phase.COMMIT_ASKED,
                      Phase.SOURCE_COMMITTED, Phase.GO_SENT, Phase.COMMIT, Phase.DONE]
    assert m.finished
    m = PhaseMachine()
    phases = [m.handle(e) for e in HAPPY_BESIDE]
    assert phases == [Phase.PRECOPY, Phase.FREEZE, Phase.FINAL, Phase.RESTORE, Phase.COMMIT_ASKED_RESTORING,
                      Phase.COMMIT_ASKED, Phase.SOURCE_COMMITTED, Phase.GO_SENT, Phase.COMMIT, Phase.DONE]
    assert m.finished


@pytest.mark.parametrize("failure", list(Failure))
@pytest.mark.parametrize("happy, steps", [(HAPPY, n) for n in range(7)] + [(HAPPY_BESIDE, n) for n in range(8)])
def test_failure_before_go_rolls_back(happy: list[Event], steps: int, failure: Failure) -> None:
    """Up to SOURCE_COMMITTED (the source asked to commit, or committed: GO not yet written),
    whatever fails, GO was never sent: the copy is destroyed, the source released."""
    m = PhaseMachine()
    for e in happy[:steps]:
        m.handle(e)
    assert m.phase in BEFORE_POINT_OF_NO_RETURN and not m.past_point_of_no_return
    assert m.action(failure) is Action.ROLL_BACK
    event = m.failure_event(failure)
    assert event is not None and m.handle(event) is Phase.ROLLBACK
    assert m.handle(Event.ROLLED_BACK) is Phase.ROLLED_BACK and m.finished


def test_failure_after_go_never_rolls_back() -> None:
    m = PhaseMachine()
    for e in HAPPY[:7]:
        m.handle(e)
    assert m.phase is Phase.GO_SENT and m.past_point_of_no_return
    for failure in Failure:       # GO may be on its way, whatever broke: never resume alone
        assert m.action(failure) is Action.KEEP_STOPPED
    assert m.handle(Event.FAILED) is Phase.UNSETTLED
    with pytest.raises(IllegalTransition):
        m.handle(Event.ROLLED_BACK)


def test_go_only_after_the_source_committed() -> None:
    """GO is written only from SOURCE_COMMITTED: never before the source answered commit_pending;
    the one way back from GO_SENT is the link refusing to write GO."""
    assert [s for (s, e) in ORCHESTRATOR.transitions if e is Event.GO] == [Phase.SOURCE_COMMITTED]
    assert {(s, e) for (s, e), n in ORCHESTRATOR.transitions.items() if n is Phase.SOURCE_COMMITTED} == \
        {(Phase.COMMIT_ASKED, Event.COMMITTED), (Phase.GO_SENT, Event.GO_REFUSED)}
    back = [(s, e) for (s, e), n in ORCHESTRATOR.transitions.items()
            if s in ORCHESTRATOR.committed and n not in ORCHESTRATOR.committed]
    assert back == [(Phase.GO_SENT, Event.GO_REFUSED)]


def test_failure_after_running_is_only_a_warning() -> None:
    m = PhaseMachine()
    for e in HAPPY[:8]:
        m.handle(e)
    assert m.action(Failure.LOCAL_ERROR) is Action.RUN_ON
    assert m.handle(Event.FAILED) is Phase.DONE


def test_illegal_transitions_name_state_and_event() -> None:
    m = PhaseMachine()
    with pytest.raises(IllegalTransition, match="running.*preflight"):
        m.handle(Event.RUNNING)
    holder = Machine(HOLDER)
    with pytest.raises(IllegalTransition, match="kill.*holder state idle"):
        holder.handle(HolderEvent.KILL)


# --- every role, every state, every failure -----------------------------------------------------

def reachable(protocol: Protocol) -> set[enum.Enum]:  # type: ignore[type-arg]
    seen, todo = {protocol.initial}, [protocol.initial]
    while todo:
        state = todo.pop()
        for (s, _), nxt in protocol.transitions.items():
            if s is state and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("role", sorted(PROTOCOLS))
def test_every_state_is_reachable_and_has_an_action_for_every_failure(role: str) -> None:
    protocol = PROTOCOLS[role]
    states: set[enum.Enum] = set(protocol.failure)       # every state has its row
    assert reachable(protocol) == states == set(type(protocol.initial).__members__.values())
    for state, failure in itertools.product(states, Failure):
        assert isinstance(protocol.action(state, failure), Action)


@pytest.mark.parametrize("failure", list(Failure))
@pytest.mark.parametrize("state", list(Phase))
def test_orchestrator_keeps_the_invariant(state: Phase, failure: Failure) -> None:
    """Before GO is sent: roll back (the source runs on, no copy runs). After: never resume the
    source; while GO is unanswered it stays stopped, once the copy runs it runs on."""
    action = ORCHESTRATOR.action(state, failure)
    if state in BEFORE_POINT_OF_NO_RETURN or state is Phase.ROLLBACK:
        assert action is Action.ROLL_BACK
    elif state is Phase.GO_SENT:
        assert action is Action.KEEP_STOPPED
    elif state is Phase.COMMIT:
        assert action is Action.RUN_ON
    else:
        assert state in (Phase.DONE, Phase.ROLLED_BACK, Phase.UNSETTLED) and action is Action.NOTHING
    assert (state in ORCHESTRATOR.committed) == (action in (Action.KEEP_STOPPED, Action.RUN_ON)
                                                 or state in (Phase.DONE, Phase.UNSETTLED))
    m = PhaseMachine(state)
    event = m.failure_event(failure)
    if event is None:
        assert action is Action.NOTHING
    else:      # the failure leads to the phase that carries its action out, and on to an end
        after = m.handle(event)
        assert after in (Phase.ROLLBACK, Phase.UNSETTLED, Phase.DONE)


@pytest.mark.parametrize("failure", list(Failure))
@pytest.mark.parametrize("state", list(HolderState))
def test_holder_and_source_keep_the_invariant(state: HolderState, failure: Failure) -> None:
    """A held source resumes until COMMIT_PENDING; from it on it stays stopped for resolve, and
    the guard SIGSTOP makes the holder's own death agree."""
    action = HOLDER.action(state, failure)
    holding = (state, HolderEvent.RELEASE) in HOLDER.transitions
    if state in HOLDER.committed:
        assert action in (Action.KEEP_STOPPED, Action.NOTHING)
        assert (action is Action.KEEP_STOPPED) == holding
    else:
        assert action is (Action.RESUME_SOURCE if holding else Action.NOTHING)
    assert guarded(state) == (action is Action.KEEP_STOPPED)
    if action in SETTLE:      # what settles it is allowed there
        assert (state, SETTLE[action]) in HOLDER.transitions


@pytest.mark.parametrize("failure", list(Failure))
@pytest.mark.parametrize("state", list(DestState))
def test_destination_keeps_the_invariant(state: DestState, failure: Failure) -> None:
    action = DESTINATION.action(state, failure)
    if state in DESTINATION.committed:
        assert action is Action.RUN_ON
        assert (state, DestEvent.ABORT) not in DESTINATION.transitions
    elif state in (DestState.IDLE, DestState.DESTROYED):
        assert action is Action.NOTHING
    else:
        assert action is Action.DESTROY_COPY and (state, DestEvent.ABORT) in DESTINATION.transitions


def test_only_an_explicit_release_leaves_the_source_committed_states() -> None:
    """Once committed, the source and destination never go back on their own: the one way back
    is the holder's RELEASE, which only the orchestrator's rollback (GO never sent) asks for."""
    for protocol in (HOLDER, DESTINATION):
        for (state, event), nxt in protocol.transitions.items():
            if state in protocol.committed and nxt not in protocol.committed:
                assert (protocol, state, event) == (HOLDER, HolderState.COMMIT_PENDING, HolderEvent.RELEASE)


# --- the four parties together ---------------------------------------------------------------

class Refused(Exception):
    """An agent answered an error (an event its state does not allow, or no session)."""


class CallFailed(Exception):
    """``written``: whether the message may have left (False: the link refused it, or a
    failure came before it was handed over)."""

    def __init__(self, failure: Failure, written: bool = True) -> None:
        super().__init__(failure.value)
        self.failure = failure
        self.written = written


class OrchestratorDied(Exception):
    pass


# A fault at a message: most strike as it is written or answered (GO among them: then it may
# arrive); "cancel" and the "-noticed" kinds come first, seen by the orchestrator before it
# writes the message (a Ctrl-C, an agent whose connection has already closed); "refused": its
# agent died unseen, and writing the message fails (it is not written).
KINDS = ("lose-request", "lose-reply", "duplicate", "delay", "delay-late", "refuse", "cancel", "cancel-after",
         "kill-orchestrator", "kill-source-agent", "kill-holder", "kill-destination-agent",
         "kill-target-after", "kill-holder-after", "source-agent-died-noticed", "destination-agent-died-noticed",
         "refused")
SOURCE_OPS: dict[str, list[HolderEvent]] = {
    "open": [HolderEvent.SEIZE], "precopy": [], "freeze": [HolderEvent.FREEZE, HolderEvent.COLLECT],
    "commit_pending": [HolderEvent.COMMIT_PENDING], "kill": [HolderEvent.KILL], "stand_in": [HolderEvent.STAND_IN],
    "hold": [HolderEvent.HOLD], "release": [HolderEvent.RELEASE]}
DEST_OPS: dict[str, list[DestEvent]] = {
    "check": [DestEvent.CHECK], "receive": [DestEvent.RECEIVE], "restore": [DestEvent.RESTORED],
    "go": [DestEvent.GO, DestEvent.RAN], "abort": [DestEvent.ABORT], "keepalive": []}


@dataclass
class World:
    """The process as the parties leave it: the source (running, frozen, stopped for resolve,
    dead), the destination's copy (none, building, ready, running, destroyed), and each party
    driven by its machine from the core. ``faults``: message index -> kind."""

    faults: dict[int, str]
    stand_in: bool = False
    # The source asked to commit while the destination restores: "commit-first" (the
    # commit and the keepalive answer before the restore) or "restore-first"; None: once ready.
    beside: str | None = None
    src: str = "running"
    traced: bool = False
    guard: bool = False
    recorded: bool = False
    copy: str = "none"
    go_delivered: bool = False
    go_written: bool = False      # the orchestrator handed GO to the destination's link
    source_trouble: bool = False  # a call to the source failed, or its agent or holder died
    committed: bool = False       # the holder reached COMMIT_PENDING at some point
    holder: Machine = field(default_factory=lambda: Machine(HOLDER))  # type: ignore[type-arg]
    mirror: HolderState = HolderState.IDLE        # the source agent's view: the holder's last answer
    holder_alive: bool = True
    agents: dict[str, bool] = field(default_factory=lambda: {"source": True, "destination": True})
    sessions: dict[str, bool] = field(default_factory=lambda: {"source": False, "destination": False})
    dest: Machine = field(default_factory=lambda: Machine(DESTINATION))  # type: ignore[type-arg]
    cut: dict[str, bool] = field(default_factory=lambda: {"source": False, "destination": False})
    # the orchestrator knows this connection is broken (closed, or given up on by its keepalive)
    gone: dict[str, bool] = field(default_factory=lambda: {"source": False, "destination": False})
    delayed: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {"source": [], "destination": []})
    orchestrator_alive: bool = True
    sent: int = 0
    resolved: bool = False        # the user had to settle a stopped source
    log: list[str] = field(default_factory=list)

    # -- the invariant, after every change --------------------------------------------------

    def check(self) -> None:
        assert (self.src == "running") + (self.copy == "running") <= 1, f"two copies run: {self.log}"

    def run_source(self) -> None:
        assert not self.go_written, f"the source resumed automatically after GO was written: {self.log}"
        self.src = "running"
        self.check()

    # -- the holder and the source agent ---------------------------------------------------

    def holder_op(self, ev: HolderEvent) -> None:
        if not self.holder_alive:
            raise Refused("the holder is gone")
        try:
            self.holder.check(ev)
        except IllegalTransition as exc:
            raise Refused(str(exc)) from None
        entering = HOLDER.transitions[(self.holder.state, ev)]
        if ev is HolderEvent.SEIZE:
            self.traced = True
        elif ev is HolderEvent.FREEZE:
            self.src = "frozen"
        elif ev is HolderEvent.COMMIT_PENDING:
            self.guard = guarded(entering)
            self.recorded = self.recorded or self.guard
        elif ev in (HolderEvent.KILL, HolderEvent.STAND_IN):
            self.src, self.traced = "dead", False
        elif ev is HolderEvent.HOLD:
            self.src, self.traced, self.recorded = "stopped", False, True
        elif ev is HolderEvent.RELEASE:
            if guarded(self.holder.state):
                self.guard, self.recorded = False, False
            self.traced = False
            self.run_source()
        self.holder.handle(ev)
        self.committed = self.committed or self.holder.state is HolderState.COMMIT_PENDING
        self.mirror = self.holder.state
        self.log.append(f"holder {ev.value} -> {self.holder.state.value}")
        self.check()

    def kill_holder(self) -> None:
        """The kernel lets a dead tracer's tracees go: the guard, if queued, stops them."""
        if not self.holder_alive:
            return
        self.holder_alive = False
        self.source_trouble = True
        self.log.append("holder killed")
        if self.traced:
            self.traced = False
            if self.guard:
                self.src = "stopped"
            elif self.src == "frozen":
                self.run_source()

    def holder_eof(self) -> None:
        """Its agent is gone: the holder does what its state says, and exits."""
        if not self.holder_alive:
            return
        event = SETTLE.get(self.holder.action(Failure.PEER_DIED))
        if event is not None:
            self.holder_op(event)
        self.holder_alive = False

    def source_settle(self, failure: Failure) -> None:
        if self.agents["source"] and self.sessions["source"]:
            self.sessions["source"] = False
            event = SETTLE.get(HOLDER.action(self.mirror, failure))
            if event is not None:
                try:
                    self.holder_op(event)
                except Refused:
                    pass
            self.holder_eof()

    # -- the destination agent --------------------------------------------------------------

    def dest_op(self, ev: DestEvent) -> None:
        if not self.sessions["destination"] and ev is not DestEvent.CHECK:
            raise Refused("no migration on this connection")
        try:
            self.dest.check(ev)
        except IllegalTransition as exc:
            raise Refused(str(exc)) from None
        if ev is DestEvent.CHECK:
            self.sessions["destination"] = True
        elif ev is DestEvent.RECEIVE:
            self.copy = "building"
        elif ev is DestEvent.RESTORED:
            self.copy = "ready"
        elif ev is DestEvent.GO:
            self.go_delivered = True
            self.copy = "running"
        elif ev is DestEvent.ABORT:
            self.copy = "destroyed"
            self.sessions["destination"] = False
        self.dest.handle(ev)
        self.log.append(f"destination {ev.value} -> {self.dest.state.value}")
        self.check()

    def dest_settle(self, failure: Failure) -> None:
        if self.agents["destination"] and self.sessions["destination"]:
            if self.dest.action(failure) is Action.DESTROY_COPY:
                self.dest_op(DestEvent.ABORT)
            self.sessions["destination"] = False

    def kill_agent(self, role: str) -> None:
        if not self.agents[role]:
            return
        self.log.append(f"{role} agent killed")
        self.agents[role] = False
        self.source_trouble = self.source_trouble or role == "source"
        self.sessions[role] = False
        if role == "source":
            self.holder_eof()
        elif self.copy in ("building", "ready"):      # EXITKILL: a copy not let go dies with it
            self.copy = "destroyed"

    # -- messages ---------------------------------------------------------------------------

    def deliver(self, role: str, op: str) -> None:
        if not self.agents[role]:
            raise Refused("dead")
        self.log.append(f"-> {role} {op}")
        if role == "source":
            if op == "open":
                self.sessions["source"] = True
            elif not self.sessions["source"]:
                raise Refused("no source process is open")
            for ev in SOURCE_OPS[op]:
                self.holder_op(ev)
        else:
            for dev in DEST_OPS[op]:
                self.dest_op(dev)

    def request(self, role: str, op: str, on_write: Callable[[], None] | None = None) -> None:
        """The orchestrator's call; raises CallFailed as the orchestrator would see it.
        ``on_write`` runs as the message is handed to the link (not if a failure came first)."""
        try:
            self._request(role, op, on_write)
        except CallFailed as exc:
            self.source_trouble = self.source_trouble or role == "source"
            if exc.failure in (Failure.PEER_DIED, Failure.LINK_LOST) and (self.cut[role] or not self.agents[role]):
                self.gone[role] = True       # closed, or silent: the keepalive gives up on it
            raise

    def _request(self, role: str, op: str, on_write: Callable[[], None] | None) -> None:
        if not self.orchestrator_alive:
            raise OrchestratorDied()
        kind = self.faults.get(self.sent)
        self.sent += 1
        for late, when in list(self.delayed[role]):
            if when == "before":
                self.delayed[role].remove((late, when))
                self._quietly(role, late)
        if kind == "kill-orchestrator":
            self.orchestrator_alive = False
            self.log.append("orchestrator killed")
            raise OrchestratorDied()
        # -- seen before the message is written: it is not --
        if kind == "cancel":
            raise CallFailed(Failure.CANCELLED, written=False)
        if kind in ("source-agent-died-noticed", "destination-agent-died-noticed"):
            who = kind.split("-")[0]
            self.kill_agent(who)
            self.gone[who] = True
        if self.gone[role]:
            raise CallFailed(Failure.LINK_LOST if self.cut[role] else Failure.PEER_DIED, written=False)
        if on_write is not None:
            on_write()
        if kind == "refused":
            self.kill_agent(role)
            raise CallFailed(Failure.PEER_DIED, written=False)
        # -- written: it may arrive --
        if kind in ("kill-source-agent", "kill-destination-agent"):
            self.kill_agent(kind.split("-")[1])
        elif kind == "kill-holder":
            self.kill_holder()
        elif kind == "lose-request":
            self.cut[role] = True
        if self.cut[role]:
            raise CallFailed(Failure.LINK_LOST)
        if not self.agents[role]:
            raise CallFailed(Failure.PEER_DIED)
        if kind in ("delay", "delay-late"):
            self.delayed[role].append((op, "before" if kind == "delay" else "after"))
            raise CallFailed(Failure.LINK_LOST)        # it timed out: the link is up
        if kind == "refuse":
            raise CallFailed(Failure.LOCAL_ERROR)
        try:
            self.deliver(role, op)
            if kind == "duplicate":
                self._quietly(role, op)
        except Refused:
            raise CallFailed(Failure.LOCAL_ERROR) from None
        finally:
            for late, when in list(self.delayed[role]):
                if when == "after":
                    self.delayed[role].remove((late, when))
                    self._quietly(role, late)
        if kind == "cancel-after":
            raise CallFailed(Failure.CANCELLED)
        if kind == "lose-reply":
            self.cut[role] = True
            raise CallFailed(Failure.LINK_LOST)
        if kind == "kill-target-after":
            self.kill_agent(role)
            raise CallFailed(Failure.PEER_DIED)
        if kind == "kill-holder-after":
            self.kill_holder()

    def _quietly(self, role: str, op: str) -> None:
        """A repeated or late message: whatever it does, its answer goes nowhere."""
        try:
            self.deliver(role, op)
        except Refused:
            pass

    # -- the orchestrator, as migrate.orchestrator drives it ----------------------------------

    def orchestrate(self) -> None:
        m = PhaseMachine()
        try:
            self.request("source", "open")
            self.request("destination", "check")
            m.handle(Event.PREFLIGHT_OK)
            self.request("destination", "receive")
            self.request("source", "precopy")
            m.handle(Event.PRECOPY_DONE)
            self.request("source", "freeze")
            m.handle(Event.FROZEN)
            m.handle(Event.STATE_SENT)
            if self.beside is None:
                self.request("destination", "restore")
                m.handle(Event.READY)
                self.request("source", "commit_pending")
                self.request("destination", "keepalive")     # alongside: it still answers
            else:
                # all three at once; the model takes their answers in one of two orders
                m.handle(Event.ASK_COMMIT)
                if self.beside == "restore-first":
                    self.request("destination", "restore")
                self.request("source", "commit_pending")
                self.request("destination", "keepalive")
                if self.beside == "commit-first":
                    self.request("destination", "restore")
                m.handle(Event.READY)
            m.handle(Event.COMMITTED)
            # GO is written only if the destination's connection is not known broken (else
            # the failure is SOURCE_COMMITTED's: roll back); from that moment it may arrive

            def written() -> None:
                m.handle(Event.GO)
                self.go_written = True
            try:
                self.request("destination", "go", on_write=written)
            except CallFailed as exc:
                if self.go_written and not exc.written:     # the link refused it: GO cannot arrive
                    m.handle(Event.GO_REFUSED)
                    self.go_written = False
                raise
            m.handle(Event.RUNNING)
            self.request("source", "stand_in" if self.stand_in else "kill")
            m.handle(Event.STOOD_IN if self.stand_in else Event.SOURCE_KILLED)
        except CallFailed as exc:
            self.failed(m, exc.failure)
        self.goodbye(Failure.PEER_DIED)

    def failed(self, m: PhaseMachine, failure: Failure) -> None:
        action = m.action(failure)
        event = m.failure_event(failure)
        if event is not None:
            m.handle(event)
        self.log.append(f"orchestrator: {failure.value} -> {action.value}")
        cleanup = {Action.ROLL_BACK: [("destination", "abort"), ("source", "release")],
                   Action.KEEP_STOPPED: [("source", "hold")]}.get(action, [])
        for role, op in cleanup:
            try:
                self.request(role, op)
            except CallFailed:
                pass
        if m.phase is Phase.ROLLBACK:
            m.handle(Event.ROLLED_BACK)
        assert m.finished

    def goodbye(self, failure: Failure) -> None:
        """The connections end: closed (the agents see their peer gone) or silent (a cut link)."""
        for role in ("destination", "source"):
            self.delayed[role].clear()
            how = Failure.LINK_LOST if self.cut[role] else failure
            (self.dest_settle if role == "destination" else self.source_settle)(how)
            self.kill_agent(role)         # the agent exits; its holder with it

    def run(self) -> None:
        try:
            self.orchestrate()
        except OrchestratorDied:
            self.goodbye(Failure.PEER_DIED)
        self.check()
        # what is left for the user: a source stopped for `resolve` is settled by looking at the
        # destination, as the report says
        assert self.src != "frozen" and not self.traced, f"the source is stuck: {self.log}"
        assert self.copy not in ("building", "ready"), f"a copy is left behind: {self.log}"
        if self.src == "stopped":
            assert self.recorded or self.guard, f"stopped, but resolve would refuse it: {self.log}"
            assert self.committed, f"stopped before the point of no return: {self.log}"
            # left for resolve only if GO may be on its way, or the source could not be reached
            assert self.go_written or self.source_trouble or not self.orchestrator_alive, \
                f"GO was never written and the source was reachable, yet it is left stopped: {self.log}"
            self.resolved = True
            self.src = "dead" if self.copy == "running" else "running"
        assert (self.src == "running") + (self.copy == "running") == 1, f"lost: {self.log}"


BESIDE = (None, "commit-first", "restore-first")


def messages(faults: dict[int, str], stand_in: bool = False, beside: str | None = None) -> int:
    w = World(faults, stand_in, beside)
    w.run()
    return w.sent


def test_the_happy_path_moves_the_process() -> None:
    for stand_in in (False, True):
        for beside in BESIDE:
            w = World({}, stand_in, beside)
            w.run()
            assert (w.src, w.copy) == ("dead", "running")


@pytest.mark.parametrize("beside", BESIDE)
def test_one_fault_at_every_message_never_loses_or_doubles(beside: str | None) -> None:
    """Every kind of fault at every message the orchestrator sends (its cleanup included)."""
    runs = 0
    for stand_in in (False, True):
        for kind in KINDS:
            at = 0
            while at < messages({at: kind}, stand_in, beside):
                runs += 1
                at += 1
    assert runs > 200


@pytest.mark.parametrize("beside", BESIDE)
def test_two_faults_never_lose_or_double(beside: str | None) -> None:
    """Two faults, each of most kinds, at every pair of messages."""
    kinds = [k for k in KINDS if k != "duplicate"]
    runs = 0
    n = messages({}, beside=beside)
    for first, second in itertools.product(kinds, repeat=2):
        for a in range(n):
            n2 = messages({a: first}, beside=beside)
            for b in range(a + 1, n2 + 1):
                World({a: first, b: second}, beside=beside).run()
                runs += 1
    assert runs > 3000


# Runs (per stand-in mode) in which the source committed and was released: a destination
# agent that died unseen before the commit (from the pre-copy on) or as it went out, and each
# kind at the messages after the commit up to GO.
RELEASED_AFTER_COMMIT = {None: 3 * 2 + 1, "commit-first": 3 * 3 + 3, "restore-first": 3 * 2 + 1}


@pytest.mark.parametrize("beside", BESIDE)
def test_go_never_written_the_source_runs_on_without_resolve(beside: str | None) -> None:
    """A destination connection known broken, or a Ctrl-C, at any message up to GO (GO
    included): GO is never written, the orchestrator rolls back itself, and the source runs on
    with no `resolve` left to do, also once it has committed (the holder releases it from
    COMMIT_PENDING)."""
    from_commit = 0
    for stand_in in (False, True):
        for kind in ("destination-agent-died-noticed", "cancel", "refused"):
            at = 0
            while True:
                w = World({at: kind}, stand_in, beside)
                w.run()
                if w.go_written:
                    break
                assert not w.resolved and (w.src, w.copy) in (("running", "none"), ("running", "destroyed")), w.log
                if (HolderState.COMMIT_PENDING, HolderEvent.RELEASE, HolderState.RESUMED) in w.holder.history:
                    from_commit += 1
                at += 1
    # with and without a stand-in; classic: each kind at the keepalive beside the commit and at
    # GO itself, and a destination that died as commit_pending went out
    assert from_commit == 2 * RELEASED_AFTER_COMMIT[beside]


def test_go_written_is_never_taken_back() -> None:
    """GO handed to a link that then breaks (cut, its agent killed, its answer late): GO may
    arrive, so the source is kept stopped, and `resolve` settles it by what the destination
    did."""
    n = messages({})
    go_at = n - 2                 # GO, then the source's end
    for kind in ("lose-request", "lose-reply", "kill-destination-agent", "kill-target-after", "delay", "delay-late",
                 "refuse"):
        w = World({go_at: kind})
        w.run()
        assert w.go_written and w.resolved, (kind, w.log)
