"""The phases of a live migration: a state machine without I/O.

The orchestrator feeds it events and asks it what may happen next; an event that does not
fit the current phase is an error naming both. The point of no return is declared here:
before ``GO`` every failure rolls back (the source runs on, the destination's copy is
destroyed); from ``GO`` on, a failure never resumes the source by itself.
"""
from __future__ import annotations

import enum

from transport.errors import MigrationError


class Phase(enum.Enum):
    PREFLIGHT = "preflight"
    PRECOPY = "precopy"
    FREEZE = "freeze"
    FINAL = "final"
    RESTORE = "restore"
    GO = "go"
    COMMIT = "commit"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    UNSETTLED = "unsettled"     # after GO, the destination's fate is unknown: the source stays stopped


class Event(enum.Enum):
    PREFLIGHT_OK = "preflight-ok"
    PRECOPY_DONE = "precopy-done"
    FROZEN = "frozen"
    STATE_SENT = "state-sent"
    READY = "ready"             # the destination restored the process and holds it stopped
    RUNNING = "running"         # the destination confirmed the process runs
    SOURCE_KILLED = "source-killed"
    STOOD_IN = "stood-in"       # the source became a stand-in (--stand-in) instead of being killed
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled-back"


BEFORE_POINT_OF_NO_RETURN = frozenset({Phase.PREFLIGHT, Phase.PRECOPY, Phase.FREEZE, Phase.FINAL, Phase.RESTORE})

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.PREFLIGHT, Event.PREFLIGHT_OK): Phase.PRECOPY,
    (Phase.PRECOPY, Event.PRECOPY_DONE): Phase.FREEZE,
    (Phase.FREEZE, Event.FROZEN): Phase.FINAL,
    (Phase.FINAL, Event.STATE_SENT): Phase.RESTORE,
    (Phase.RESTORE, Event.READY): Phase.GO,
    (Phase.GO, Event.RUNNING): Phase.COMMIT,
    (Phase.GO, Event.FAILED): Phase.UNSETTLED,
    (Phase.GO, Event.CANCELLED): Phase.UNSETTLED,
    (Phase.COMMIT, Event.SOURCE_KILLED): Phase.DONE,
    (Phase.COMMIT, Event.STOOD_IN): Phase.DONE,
    (Phase.COMMIT, Event.FAILED): Phase.DONE,        # a warning: the process runs on the destination
    (Phase.COMMIT, Event.CANCELLED): Phase.DONE,
    (Phase.ROLLBACK, Event.ROLLED_BACK): Phase.ROLLED_BACK,
    (Phase.ROLLBACK, Event.FAILED): Phase.ROLLED_BACK,
    (Phase.ROLLBACK, Event.CANCELLED): Phase.ROLLBACK,
}
for _phase in BEFORE_POINT_OF_NO_RETURN:
    TRANSITIONS[(_phase, Event.FAILED)] = Phase.ROLLBACK
    TRANSITIONS[(_phase, Event.CANCELLED)] = Phase.ROLLBACK

TERMINAL = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.UNSETTLED})


class IllegalTransition(MigrationError):
    code = "illegal-transition"


class PhaseMachine:
    def __init__(self) -> None:
        self.phase = Phase.PREFLIGHT
        self.history: list[tuple[Phase, Event, Phase]] = []

    def handle(self, event: Event) -> Phase:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise IllegalTransition(f"event {event.value} is not allowed in phase {self.phase.value}",
                                    phase=self.phase.value)
        self.history.append((self.phase, event, nxt))
        self.phase = nxt
        return nxt

    @property
    def past_point_of_no_return(self) -> bool:
        """From GO on the source must never be resumed by the tool on its own."""
        return self.phase not in BEFORE_POINT_OF_NO_RETURN and self.phase not in (Phase.ROLLBACK, Phase.ROLLED_BACK)

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL
