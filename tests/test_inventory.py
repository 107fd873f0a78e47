"""The inventory (agent/inventory.py) against what the code and the README do.

A field the dump writes that no row names, a refusal the table does not know, or a refused or
lost kind the README's Limits do not mention: each fails here, so nothing a process holds is
dropped without the table (and the user) saying so.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from agent import inventory
from agent.procfs import _FD_REFUSALS
from transport import schema

README = Path(__file__).resolve().parent.parent / "README.md"
# The records a process's state travels in, and the parts of them that are records too.
STATE_RECORDS = (schema.ProcessState, schema.ThreadState, schema.Creds, schema.MmFields, schema.PosixTimer,
                 schema.Vma, schema.FileDesc, schema.EventFile, schema.UnixSocket, schema.PipeBuffer,
                 schema.FileContents, schema.SysvSegment, schema.SeccompFilter, schema.MemPolicy,
                 schema.GuardRegion, schema.InetSocket, schema.InetOption,
                 schema.TcpConnection, schema.InetDatagram)
# Fields that name or check a record rather than carry state.
BOOKKEEPING = {"FileContents.id", "EventFile.id", "UnixSocket.id", "PipeBuffer.id", "InetSocket.id"}


def named_fields() -> set[str]:
    return {f for row in inventory.ROWS for f in row.fields}


def test_every_field_of_the_state_records_has_a_row() -> None:
    fields = {f"{cls.__name__}.{f.name}" for cls in STATE_RECORDS for f in dataclasses.fields(cls)}
    missing = sorted(fields - named_fields() - BOOKKEEPING)
    assert not missing, f"no inventory row says what happens to {missing}: add one to agent/inventory.py"


def test_every_row_names_real_fields_and_a_known_status() -> None:
    fields = {f"{cls.__name__}.{f.name}" for cls in STATE_RECORDS for f in dataclasses.fields(cls)}
    for row in inventory.ROWS:
        assert row.status in (inventory.CARRIED, inventory.WARNED, inventory.REFUSED, inventory.LOST), row
        assert set(row.fields) <= fields, (row, set(row.fields) - fields)
        assert not (row.fields and row.status in (inventory.REFUSED, inventory.LOST)), row


def test_every_fd_kind_and_event_kind_is_a_row() -> None:
    whats = {row.what for row in inventory.ROWS if row.area == "fd"}
    names = {"file": "a regular file", "dir": "a directory", "chr": "/dev/null and similar", "pipe": "a pipe",
             "unix": "a unix socket", "redirect": "a redirected fd", "deleted": "a deleted file",
             "eventfd": "an eventfd", "timerfd": "a timerfd", "signalfd": "a signalfd", "epoll": "an epoll instance",
             "pidfd": "a pidfd", "inotify": "an inotify instance", "fifo": "a FIFO", "fanotify": "a fanotify instance",
             "inet": "a TCP or UDP socket"}
    assert set(names) == set(schema.FD_KINDS), "a new fd kind needs a row (and a name here)"
    assert set(names.values()) <= whats


def test_preflight_refuses_fds_by_the_tables_rows() -> None:
    refused = {(row.target, row.what) for row in inventory.ROWS if row.target}
    assert set(_FD_REFUSALS) == refused
    assert all(row.status == inventory.REFUSED for row in inventory.ROWS if row.target)


def test_the_readme_names_everything_refused_or_lost() -> None:
    text = re.sub(r"\s+", " ", README.read_text())
    limits = text[text.index("## Limits"):] if "## Limits" in text else text
    for row in inventory.ROWS:
        if row.status in (inventory.REFUSED, inventory.LOST):
            assert row.readme and row.readme in limits, f"README's Limits do not mention {row.what!r} ({row.readme!r})"


def test_the_state_checker_knows_every_row_carried() -> None:
    """tests/_state.py compares a moved process's state row by row: a carried or warned row
    needs a way to see it from outside, or a reason it cannot be (and where it is checked)."""
    from tests import _state
    kept = {row.what for row in inventory.ROWS if row.status in (inventory.CARRIED, inventory.WARNED)}
    missing = sorted(kept - set(_state.OBSERVE) - set(_state.UNOBSERVED))
    assert not missing, f"tests/_state.py cannot see {missing}: add an OBSERVE entry (or an UNOBSERVED reason)"
    assert not set(_state.OBSERVE) & set(_state.UNOBSERVED)
    assert set(_state.OBSERVE) | set(_state.UNOBSERVED) <= kept, "the checker names rows the table does not carry"
    fields = {f"{cls.__name__}.{f.name}" for cls in STATE_RECORDS for f in dataclasses.fields(cls)}
    assert set(_state.VOLATILE) | _state.PIDS | _state.IDS <= fields
