"""agent.sessions: the order that makes a tree's sessions and process groups again, on trees
as /proc shows them (the restore of ckpt_sessions.c, in test_trees and test_live_trees, runs
such plans on real processes)."""
from __future__ import annotations

import pytest

from agent import sessions
from agent.sessions import Fork, Helper, Join, OwnGroup, Reap, Setsid
from transport.errors import UnsupportedResource
from transport.schema import TreeMember


def M(pid: int, ppid: int, sid: int, pgid: int, exit_status: int = -1) -> TreeMember:
    return TreeMember(pid=pid, ppid=ppid, pgid=pgid, sid=sid, comm="x", exit_status=exit_status)


def test_a_child_forked_after_its_parents_setsid_is_forked_after_it() -> None:
    tree = [M(10, 1, 5, 5), M(11, 10, 11, 11), M(12, 11, 11, 12)]
    assert sessions.plan(tree, tree[1:]) == [Fork(11, 10), Setsid(11), Fork(12, 11), OwnGroup(12)]


def test_a_child_forked_before_its_parents_setsid_keeps_the_older_session() -> None:
    tree = [M(10, 1, 10, 10), M(11, 10, 11, 11), M(12, 11, 10, 10)]
    assert sessions.plan(tree, tree[1:]) == [Fork(11, 10), Fork(12, 11), Setsid(11)]


def test_a_group_whose_leader_exited_is_made_by_a_helper() -> None:
    tree = [M(10, 1, 10, 10), M(12, 10, 10, 11), M(13, 12, 10, 11, exit_status=0)]
    assert sessions.plan(tree, tree[1:]) == [Fork(12, 10), Fork(13, 12), Helper(11, 12), OwnGroup(11),
                                             Join(12, 11), Join(13, 11), Reap(11, 12)]


def test_a_session_whose_leader_exited_is_made_by_a_helper_with_clone_parent() -> None:
    tree = [M(10, 1, 10, 10), M(12, 10, 11, 11), M(13, 10, 11, 11)]
    assert sessions.plan(tree, tree[1:]) == [Helper(11, 10), Setsid(11), Fork(12, 11, sibling=True),
                                             Fork(13, 11, sibling=True), Reap(11, 10)]


def test_the_outside_session_and_group_become_the_roots() -> None:
    tree = [M(10, 1, 0, 0), M(11, 10, 0, 0), M(12, 11, 0, 0)]     # (0: led from an outer pid namespace)
    assert sessions.targets(tree) == {10: sessions.Ids(10, 10), 11: sessions.Ids(10, 10), 12: sessions.Ids(10, 10)}
    assert sessions.plan(tree, tree[1:]) == [Fork(11, 10), Fork(12, 11)]


@pytest.mark.parametrize("tree, said", [
    # adopted by a subreaper into the session of a leader that still runs
    ([M(10, 1, 10, 10), M(11, 10, 11, 11), M(13, 10, 11, 11)], "pid 13 is in the session of pid 11, but its parent 10"),
    # one exited leader's session with members under two parents
    ([M(10, 1, 10, 10), M(12, 10, 10, 10), M(13, 10, 11, 11), M(14, 12, 11, 11)],
     "the processes of session 11, whose leader has exited, have different parents"),
])
def test_trees_no_order_makes_are_refused(tree: list[TreeMember], said: str) -> None:
    with pytest.raises(UnsupportedResource, match=said):
        sessions.check(tree)
