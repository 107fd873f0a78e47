"""The protocol core of a live migration: each role's states, and the point of no return, without I/O.

Four parties take part, each with a state machine here: the orchestrator (kcr-migrate, whose
states are the migration's phases), the source agent and its holder (the process that traces
the source process), and the destination agent. Each machine has one transition table; an
event that does not fit the state is an error naming both. The I/O code (``migrate.orchestrator``,
``agent.source``, ``agent.holder``, ``agent.destination``, the agents' watchdog in
``agent.serve``) feeds its machine the events as they happen and, when something fails, asks
its machine what to do (``Machine.action``) instead of deciding for itself. No trio, no sockets,
no processes here: the agents import it (a few milliseconds; it pulls in neither trio nor asyncssh).

The point of no return, declared once::

    holder/source  IDLE -seize-> HELD -freeze-> FROZEN -collect-> COLLECTED
                   -commit_pending-> COMMIT_PENDING -> KILLED | KEEPER (stand-in) | STOPPED (hold)
                   (RELEASE from any held state: RESUMED)
    destination    IDLE -check-> CHECKED -receive-> RECEIVING -restored-> READY -go-> GOING -ran-> RUNNING
                   (ABORT before GOING: DESTROYED)
    orchestrator   PREFLIGHT PRECOPY FREEZE FINAL RESTORE [COMMIT_ASKED_RESTORING] COMMIT_ASKED
                   SOURCE_COMMITTED | GO_SENT COMMIT DONE
                   (a failure: ROLLBACK -> ROLLED_BACK before GO_SENT, UNSETTLED in it, DONE after)

What each state does when its party fails (``Failure``: the peer died, the link went silent,
a cancel, its own step failed) is one table per role (``Protocol.failure``):

* Before COMMIT_PENDING the source resumes (``RESUME_SOURCE``); from it on it stays stopped
  until ``kcr-migrate resolve`` (``KEEP_STOPPED``): the holder queues a SIGSTOP (the guard)
  on entering that state, so even the holder's own death, which lets the process go,
  stops it. The source agent's state is its holder's (the holder says it in every answer).
  The one way out of COMMIT_PENDING back to running is the orchestrator's RELEASE.
* Before GOING the destination destroys its copy (``DESTROY_COPY``); from it on the copy
  runs on (``RUN_ON``).
* The orchestrator rolls back (``ROLL_BACK``: destroy the copy, release the source) up to
  SOURCE_COMMITTED, whatever the failure: GO was never handed to the destination's link, so
  no copy can run, and the source, committed or asked to, is released (RELEASE discards the
  guard); only a source agent it cannot reach any more is left to ``resolve --resume`` (the
  report says unsettled). In COMMIT_ASKED the destination must answer too (beside the
  commit), so one that died there is seen before GO, not after. The source is asked either
  once the destination holds the process ready (RESTORE -ready-> COMMIT_ASKED), or while it
  restores (RESTORE -ask_commit-> COMMIT_ASKED_RESTORING -ready-> COMMIT_ASKED): the commit's
  round trip is then hidden in the restore's time instead of adding to the freeze. That is
  chosen only for a job in which the SIGCONT that discards the guard would go unseen (no
  process job-control stopped, none catching SIGCONT, no thread blocking it): a restore that
  fails after the source committed releases it with that SIGCONT. The
  line between "GO never written" and "GO written, no answer" is the event GO: the
  orchestrator takes it, with no wait in between, just before it hands GO to the link, and
  only while that connection is not known to be broken. From GO_SENT on, GO may be on its way
  (a link that broke under it may deliver it later, or may have delivered it to an agent that
  ran the copy and died before answering): the source is kept stopped (``KEEP_STOPPED``,
  "unsettled"), for every failure alike, a timeout or a Ctrl-C while GO is being written
  included (it may still go out). One exception, GO_REFUSED: the link itself refused to write
  GO (the connection had ended before GO's last byte was taken: a frame cut short is never
  acted on, and nothing follows it on a broken connection), so it cannot arrive, and the
  orchestrator is back in SOURCE_COMMITTED. Once the copy runs (COMMIT), failures are
  warnings (``RUN_ON``).

The orchestrator sends GO only after the source confirmed COMMIT_PENDING, and a destination
runs its copy only on GO: so at most one copy runs, and the source is never resumed
automatically once a copy may run. ``tests/test_phases.py`` checks every state of every role
under every failure, and walks the four parties together through lost, repeated and
reordered messages and a party killed at each step.
"""
from __future__ import annotations

import enum
from dataclasses import field
from typing import Generic, Mapping, TypeVar

from transport.errors import MigrationError
from transport.frozen import frozen


class Failure(enum.Enum):
    """What can go wrong around a party, as it sees it."""

    PEER_DIED = "peer-died"        # the party it answers to (or drives) ended: its connection closed
    LINK_LOST = "link-lost"        # no word for --link-timeout: a cut link keeps a connection open, silent
    CANCELLED = "cancelled"        # Ctrl-C, Migration.cancel(), the orchestrator's rollback
    LOCAL_ERROR = "local-error"    # its own step failed


class Action(enum.Enum):
    """What a party does about the process when it fails in a state."""

    ROLL_BACK = "roll-back"          # the orchestrator: destroy the copy, let the source run on
    RESUME_SOURCE = "resume-source"  # the source runs on, as if nothing happened
    DESTROY_COPY = "destroy-copy"    # the destination's copy (half-built, or ready and stopped) is removed
    KEEP_STOPPED = "keep-stopped"    # the source stays stopped until `kcr-migrate resolve`
    RUN_ON = "run-on"                # the destination's copy runs: nothing is undone
    NOTHING = "nothing"              # nothing is held (not begun, or settled)


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(MigrationError):
    code = "illegal-transition"


@frozen
class Protocol(Generic[S, E]):
    """One role's machine: its first state, its transitions, what each state does on failure
    (``failure``, for every kind unless ``overrides`` says otherwise), and which states lie
    past this role's point of no return."""

    role: str
    initial: S
    transitions: Mapping[tuple[S, E], S]
    failure: Mapping[S, Action]
    committed: frozenset[S]
    overrides: Mapping[tuple[S, Failure], Action] = field(default_factory=dict)

    def action(self, state: S, failure: Failure) -> Action:
        return self.overrides.get((state, failure), self.failure[state])


class Machine(Generic[S, E]):
    """One party's state under its ``Protocol``."""

    def __init__(self, protocol: Protocol[S, E], state: S | None = None) -> None:
        self.protocol = protocol
        self.state: S = protocol.initial if state is None else state
        self.history: list[tuple[S, E, S]] = []

    def allows(self, event: E) -> bool:
        return (self.state, event) in self.protocol.transitions

    def check(self, event: E) -> None:
        """Raise unless ``event`` fits the current state (before acting on it)."""
        if not self.allows(event):
            raise IllegalTransition(f"event {event.value} is not allowed in {self.protocol.role} state "
                                    f"{self.state.value}", phase=self.state.value)

    def handle(self, event: E) -> S:
        self.check(event)
        nxt = self.protocol.transitions[(self.state, event)]
        self.history.append((self.state, event, nxt))
        self.state = nxt
        return nxt

    def action(self, failure: Failure) -> Action:
        """What this party does, in its state, about ``failure``."""
        return self.protocol.action(self.state, failure)

    @property
    def past_point_of_no_return(self) -> bool:
        return self.state in self.protocol.committed


# --- the orchestrator: the migration's phases ---------------------------------------------------

class Phase(enum.Enum):
    PREFLIGHT = "preflight"
    PRECOPY = "precopy"
    FREEZE = "freeze"
    FINAL = "final"
    RESTORE = "restore"
    # the source is asked to commit while the destination restores (a job that cannot see the
    # SIGCONT a rollback from here sends: ``agent.holder``)
    COMMIT_ASKED_RESTORING = "commit-asked-restoring"
    COMMIT_ASKED = "commit-asked"   # the destination holds the process ready; the source is asked to commit
    SOURCE_COMMITTED = "source-committed"   # the source committed; GO not yet handed to the destination's link
    GO_SENT = "go"                  # GO handed to the destination's link: it may arrive
    COMMIT = "commit"               # the destination confirmed the process runs: the source is ended
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    UNSETTLED = "unsettled"         # GO unanswered: the source stays stopped until resolved


class Event(enum.Enum):
    PREFLIGHT_OK = "preflight-ok"
    PRECOPY_DONE = "precopy-done"
    FROZEN = "frozen"
    STATE_SENT = "state-sent"
    READY = "ready"             # the destination restored the process and holds it stopped
    ASK_COMMIT = "ask-commit"   # the source is asked to commit before the destination is ready
    COMMITTED = "committed"     # the source answered commit_pending: losing it now stops the source
    GO = "go"                   # GO is handed to the destination's link (not known broken): it may arrive
    GO_REFUSED = "go-refused"   # the link refused GO (its connection had ended): not a byte of it can arrive
    RUNNING = "running"         # the destination confirmed the process runs
    SOURCE_KILLED = "source-killed"
    STOOD_IN = "stood-in"       # the source became a stand-in (--stand-in) instead of being killed
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled-back"


# GO never written: whatever fails, no copy can run, and the source may be released
BEFORE_POINT_OF_NO_RETURN = frozenset({Phase.PREFLIGHT, Phase.PRECOPY, Phase.FREEZE, Phase.FINAL, Phase.RESTORE,
                                       Phase.COMMIT_ASKED_RESTORING, Phase.COMMIT_ASKED, Phase.SOURCE_COMMITTED})
# The source was asked to commit: a rollback that cannot reach it leaves it stopped for resolve
ASKED_TO_COMMIT = frozenset({Phase.COMMIT_ASKED_RESTORING, Phase.COMMIT_ASKED, Phase.SOURCE_COMMITTED})
_ORCHESTRATOR_FAILURE = {
    **{p: Action.ROLL_BACK for p in BEFORE_POINT_OF_NO_RETURN},
    Phase.GO_SENT: Action.KEEP_STOPPED,
    Phase.COMMIT: Action.RUN_ON,
    Phase.ROLLBACK: Action.ROLL_BACK,          # a failure while rolling back: roll back on
    Phase.DONE: Action.NOTHING, Phase.ROLLED_BACK: Action.NOTHING, Phase.UNSETTLED: Action.NOTHING,
}
# Where a failure leads: the state that carries out the action.
_AFTER_FAILURE = {Action.ROLL_BACK: Phase.ROLLBACK, Action.KEEP_STOPPED: Phase.UNSETTLED, Action.RUN_ON: Phase.DONE}

_ORCHESTRATOR_TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.PREFLIGHT, Event.PREFLIGHT_OK): Phase.PRECOPY,
    (Phase.PRECOPY, Event.PRECOPY_DONE): Phase.FREEZE,
    (Phase.FREEZE, Event.FROZEN): Phase.FINAL,
    (Phase.FINAL, Event.STATE_SENT): Phase.RESTORE,
    (Phase.RESTORE, Event.READY): Phase.COMMIT_ASKED,
    (Phase.RESTORE, Event.ASK_COMMIT): Phase.COMMIT_ASKED_RESTORING,
    (Phase.COMMIT_ASKED_RESTORING, Event.READY): Phase.COMMIT_ASKED,
    (Phase.COMMIT_ASKED, Event.COMMITTED): Phase.SOURCE_COMMITTED,
    (Phase.SOURCE_COMMITTED, Event.GO): Phase.GO_SENT,
    # The one way back from the point of no return: the link refused to write GO, so GO never
    # left and cannot arrive; what fails next is SOURCE_COMMITTED's (roll back).
    (Phase.GO_SENT, Event.GO_REFUSED): Phase.SOURCE_COMMITTED,
    (Phase.GO_SENT, Event.RUNNING): Phase.COMMIT,
    (Phase.COMMIT, Event.SOURCE_KILLED): Phase.DONE,
    (Phase.COMMIT, Event.STOOD_IN): Phase.DONE,
    (Phase.ROLLBACK, Event.ROLLED_BACK): Phase.ROLLED_BACK,
}
for _phase, _action in _ORCHESTRATOR_FAILURE.items():
    if _action in _AFTER_FAILURE:
        for _event in (Event.FAILED, Event.CANCELLED):
            _ORCHESTRATOR_TRANSITIONS[(_phase, _event)] = _AFTER_FAILURE[_action]

ORCHESTRATOR: Protocol[Phase, Event] = Protocol(
    "orchestrator", Phase.PREFLIGHT, _ORCHESTRATOR_TRANSITIONS, _ORCHESTRATOR_FAILURE,
    committed=frozenset({Phase.GO_SENT, Phase.COMMIT, Phase.DONE, Phase.UNSETTLED}))
TERMINAL = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.UNSETTLED})


class PhaseMachine(Machine[Phase, Event]):
    """The orchestrator's machine; ``phase`` is its state."""

    def __init__(self, phase: Phase = Phase.PREFLIGHT) -> None:
        super().__init__(ORCHESTRATOR, phase)

    @property
    def phase(self) -> Phase:
        return self.state

    def failure_event(self, failure: Failure) -> Event | None:
        """The event that takes a failure to the phase carrying out its action (``action``);
        None where nothing is left to do."""
        if self.action(failure) is Action.NOTHING:
            return None
        return Event.CANCELLED if failure is Failure.CANCELLED else Event.FAILED

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


# --- the holder, and the source agent that drives it ------------------------------------------

class HolderState(enum.Enum):
    IDLE = "idle"
    HELD = "held"                      # traced, running (pre-copy)
    FROZEN = "frozen"                  # every thread stopped (the final round)
    COLLECTED = "collected"            # its state read and sent
    COMMIT_PENDING = "commit-pending"  # the guard SIGSTOP queued: the destination may be told to go
    KILLED = "killed"
    KEEPER = "keeper"                  # the holder keeps the stand-in (--stand-in)
    STOPPED = "stopped"                # left stopped, untraced, for `kcr-migrate resolve`
    RESUMED = "resumed"                # let go, running (rollback)


class HolderEvent(enum.Enum):
    SEIZE = "seize"
    FREEZE = "freeze"
    COLLECT = "collect"
    COMMIT_PENDING = "commit_pending"
    KILL = "kill"
    STAND_IN = "stand_in"
    HOLD = "hold"
    RELEASE = "release"


_HOLDING = (HolderState.HELD, HolderState.FROZEN, HolderState.COLLECTED, HolderState.COMMIT_PENDING)
HOLDER: Protocol[HolderState, HolderEvent] = Protocol(
    "holder", HolderState.IDLE,
    {
        (HolderState.IDLE, HolderEvent.SEIZE): HolderState.HELD,
        (HolderState.HELD, HolderEvent.FREEZE): HolderState.FROZEN,
        (HolderState.FROZEN, HolderEvent.COLLECT): HolderState.COLLECTED,
        (HolderState.COLLECTED, HolderEvent.COMMIT_PENDING): HolderState.COMMIT_PENDING,
        (HolderState.COMMIT_PENDING, HolderEvent.KILL): HolderState.KILLED,
        (HolderState.COMMIT_PENDING, HolderEvent.STAND_IN): HolderState.KEEPER,
        (HolderState.COMMIT_PENDING, HolderEvent.HOLD): HolderState.STOPPED,
        # GO was never handed to the destination's link: the rollback discards the guard
        **{(s, HolderEvent.RELEASE): HolderState.RESUMED for s in _HOLDING},
    },
    {
        HolderState.IDLE: Action.NOTHING,
        HolderState.HELD: Action.RESUME_SOURCE,
        HolderState.FROZEN: Action.RESUME_SOURCE,
        HolderState.COLLECTED: Action.RESUME_SOURCE,
        HolderState.COMMIT_PENDING: Action.KEEP_STOPPED,
        HolderState.KILLED: Action.NOTHING,
        HolderState.KEEPER: Action.NOTHING,
        HolderState.STOPPED: Action.NOTHING,
        HolderState.RESUMED: Action.NOTHING,
    },
    committed=frozenset({HolderState.COMMIT_PENDING, HolderState.KILLED, HolderState.KEEPER, HolderState.STOPPED}),
)
SOURCE = HOLDER      # the source agent's state is its holder's, as the holder last answered
# The holder operation that carries out an action on the source.
SETTLE = {Action.RESUME_SOURCE: HolderEvent.RELEASE, Action.KEEP_STOPPED: HolderEvent.HOLD}


def guarded(state: HolderState) -> bool:
    """Whether the held processes carry the guard SIGSTOP in ``state``: so that the holder's own
    death (the kernel lets its tracees go) does what its rule says, the guard is queued exactly
    where a failure keeps the source stopped."""
    return HOLDER.failure[state] is Action.KEEP_STOPPED


# --- the destination agent ----------------------------------------------------------------------

class DestState(enum.Enum):
    IDLE = "idle"
    CHECKED = "checked"        # preflight passed
    RECEIVING = "receiving"    # the stream is being applied: a half-built copy
    READY = "ready"            # restored, stopped
    GOING = "going"            # told to go: its threads are being let run
    RUNNING = "running"
    DESTROYED = "destroyed"


class DestEvent(enum.Enum):
    CHECK = "check"
    RECEIVE = "receive"
    RESTORED = "restored"
    GO = "go"
    RAN = "ran"
    ABORT = "abort"


_BUILDING = (DestState.CHECKED, DestState.RECEIVING, DestState.READY)
DESTINATION: Protocol[DestState, DestEvent] = Protocol(
    "destination", DestState.IDLE,
    {
        (DestState.IDLE, DestEvent.CHECK): DestState.CHECKED,
        (DestState.CHECKED, DestEvent.RECEIVE): DestState.RECEIVING,
        (DestState.RECEIVING, DestEvent.RESTORED): DestState.READY,
        (DestState.READY, DestEvent.GO): DestState.GOING,
        (DestState.GOING, DestEvent.RAN): DestState.RUNNING,
        **{(s, DestEvent.ABORT): DestState.DESTROYED for s in _BUILDING},
    },
    {
        DestState.IDLE: Action.NOTHING,
        **{s: Action.DESTROY_COPY for s in _BUILDING},
        DestState.GOING: Action.RUN_ON,
        DestState.RUNNING: Action.RUN_ON,
        DestState.DESTROYED: Action.NOTHING,
    },
    committed=frozenset({DestState.GOING, DestState.RUNNING}),
)

PROTOCOLS: dict[str, Protocol] = {  # type: ignore[type-arg]
    "orchestrator": ORCHESTRATOR, "source": SOURCE, "holder": HOLDER, "destination": DESTINATION}
