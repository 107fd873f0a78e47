"""The phase machine, without processes or sockets."""
from __future__ import annotations

import pytest

from migrate.phases import BEFORE_POINT_OF_NO_RETURN, Event, IllegalTransition, Phase, PhaseMachine

HAPPY = [Event.PREFLIGHT_OK, Event.PRECOPY_DONE, Event.FROZEN, Event.STATE_SENT, Event.READY, Event.RUNNING,
         Event.SOURCE_KILLED]


def test_the_happy_path() -> None:
    m = PhaseMachine()
    phases = [m.handle(e) for e in HAPPY]
    assert phases == [Phase.PRECOPY, Phase.FREEZE, Phase.FINAL, Phase.RESTORE, Phase.GO, Phase.COMMIT, Phase.DONE]
    assert m.finished


@pytest.mark.parametrize("steps", range(5))
def test_failure_before_go_rolls_back(steps: int) -> None:
    m = PhaseMachine()
    for e in HAPPY[:steps]:
        m.handle(e)
    assert m.phase in BEFORE_POINT_OF_NO_RETURN and not m.past_point_of_no_return
    assert m.handle(Event.FAILED) is Phase.ROLLBACK
    assert m.handle(Event.ROLLED_BACK) is Phase.ROLLED_BACK and m.finished


def test_failure_after_go_never_rolls_back() -> None:
    m = PhaseMachine()
    for e in HAPPY[:5]:
        m.handle(e)
    assert m.phase is Phase.GO and m.past_point_of_no_return
    assert m.handle(Event.FAILED) is Phase.UNSETTLED
    with pytest.raises(IllegalTransition):
        m.handle(Event.ROLLED_BACK)


def test_failure_after_running_is_only_a_warning() -> None:
    m = PhaseMachine()
    for e in HAPPY[:6]:
        m.handle(e)
    assert m.handle(Event.FAILED) is Phase.DONE


def test_illegal_transitions_name_phase_and_event() -> None:
    m = PhaseMachine()
    with pytest.raises(IllegalTransition, match="running.*preflight"):
        m.handle(Event.RUNNING)
