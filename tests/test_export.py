"""CSV export: header and column order, UTC times, outcomes, filters, and flat memory while streaming."""

from __future__ import annotations

import csv
import gc
import inspect
import io
import itertools
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, insert

from bot.reports.export import COLUMNS, export_command, export_rows, iso_utc, parse_bound, write_export
from storage.db import make_sessionmaker
from storage.models import Account, Conversation

CONVERSATIONS = cast(Table, Conversation.__table__)
ACCOUNTS = cast(Table, Account.__table__)
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
H = timedelta(hours=1)


def conversation_row(number: int, opened: datetime, **more: Any) -> dict[str, Any]:
    """A complete conversations row (every NOT NULL column), waiting for a first response."""
    row: dict[str, Any] = {
        "id": number,
        "account_id": 1,
        "thread_key": f"t{number}",
        "author_id": f"id-{number}",
        "author_name": None,
        "author_handle": f"customer{number}",
        "status": "open",
        "team": "care",
        "priority": "normal",
        "policy": "classic",
        "route_rule": None,
        "owner": "sam",
        "assigned_at": opened,
        "claimed_by": None,
        "claimed_at": None,
        "opened_at": opened,
        "cycle": 0,
        "cycle_started_at": opened,
        "clock_started_at": opened,
        "due_at": opened + 24 * H,
        "last_customer_post_at": opened,
        "first_response_at": None,
        "answered_at": None,
        "answered_by": None,
        "breached_at": None,
        "breach_cycle": None,
        "closed_at": None,
        "close_reason": None,
        "acknowledged_at": None,
        "warnings_sent": 0,
        "nag_level": 0,
        "escalation_step": 0,
        "reassignments": 0,
        "next_action_at": opened + 18 * H,
        "slack_channel": "#care",
        "slack_ts": None,
        "version": 1,
    }
    row.update(more)
    return row


def seed(engine: Engine, rows: Iterator[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ACCOUNTS).values(id=1, name="social", kind="demo"))
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 5000:
                conn.execute(insert(CONVERSATIONS), chunk)
                chunk = []
        if chunk:
            conn.execute(insert(CONVERSATIONS), chunk)


def export(engine: Engine, **filters: Any) -> list[dict[str, str]]:
    out = io.StringIO()
    with make_sessionmaker(engine)() as session:
        write_export(session, out, **filters)
    return list(csv.DictReader(io.StringIO(out.getvalue())))


@pytest.fixture
def four(engine: Engine) -> Engine:
    """Four conversations with hand-chosen timestamps and outcomes."""
    seed(
        engine,
        iter(
            [
                # 1: answered in 2 h 30 min 15.25 s, on time.
                conversation_row(
                    1,
                    T0,
                    status="answered",
                    first_response_at=T0 + timedelta(hours=2, minutes=30, seconds=15, microseconds=250000),
                    answered_at=T0 + timedelta(hours=2, minutes=30, seconds=15, microseconds=250000),
                    answered_by="expert:sam",
                    acknowledged_at=T0,
                    route_rule="outage",
                    next_action_at=None,
                ),
                # 2: billing, never answered, breached, closed as spam.
                conversation_row(
                    2,
                    T0 + 5 * H,
                    team="billing",
                    policy="billing",
                    owner="maria",
                    status="closed",
                    breached_at=T0 + 13 * H,
                    breach_cycle=0,
                    closed_at=T0 + 20 * H,
                    close_reason="spam",
                    next_action_at=None,
                ),
                # 3: still open; the next day.
                conversation_row(
                    3, T0 + 24 * H, owner=None, assigned_at=None, author_handle="=cmd|' /C calc'!A0"
                ),
                # 4: answered, reopened, answered late in its second cycle, then closed.
                conversation_row(
                    4,
                    T0 + 48 * H,
                    status="closed",
                    cycle=1,
                    first_response_at=T0 + 49 * H,
                    cycle_started_at=T0 + 50 * H,
                    answered_at=T0 + 80 * H,
                    breached_at=T0 + 74 * H,
                    breach_cycle=1,
                    closed_at=T0 + 81 * H,
                    close_reason="resolved",
                    next_action_at=None,
                ),
            ]
        ),
    )
    return engine


def test_header_and_column_order_are_stable(four: Engine) -> None:
    out = io.StringIO()
    with make_sessionmaker(four)() as session:
        count = write_export(session, out, since=T0)
    assert count == 4
    lines = out.getvalue().split("\n")
    # The documented order; changing it breaks users' scripts (add new columns at the end).
    assert lines[0] == (
        "conversation_id,team,account,priority,policy,route_rule,status,outcome,breached,owner,"
        "claimed_by,answered_by,close_reason,cycle,author_id,author_handle,opened_at,"
        "clock_started_at,assigned_at,claimed_at,acknowledged_at,cycle_started_at,"
        "last_customer_post_at,due_at,first_response_at,answered_at,breached_at,closed_at,"
        "first_response_seconds,first_due_at,first_response_verdict,late_by_seconds,"
        "resolution_due_at,resolution_verdict,waiting_since"
    )
    assert tuple(lines[0].split(",")) == COLUMNS
    assert lines[-1] == "" and len(lines) == 6  # header, 4 rows, final newline
    assert [row.split(",")[0] for row in lines[1:5]] == ["1", "2", "3", "4"]


def test_rows_carry_every_timestamp_in_utc_and_the_outcome(four: Engine) -> None:
    rows = {row["conversation_id"]: row for row in export(four, since=T0)}
    first = rows["1"]
    assert first["opened_at"] == "2026-11-23T08:00:00Z"
    assert first["first_response_at"] == "2026-11-23T10:30:15.250000Z"
    assert first["first_response_seconds"] == "9015.25"
    assert first["due_at"] == "2026-11-24T08:00:00Z"
    assert first["acknowledged_at"] == first["assigned_at"] == first["cycle_started_at"] == first["opened_at"]
    assert (first["closed_at"], first["breached_at"], first["claimed_at"]) == ("", "", "")
    assert (first["team"], first["account"], first["policy"], first["route_rule"]) == (
        "care",
        "social",
        "classic",
        "outage",
    )
    assert (first["status"], first["outcome"], first["breached"], first["answered_by"]) == (
        "answered",
        "answered",
        "false",
        "expert:sam",
    )
    second = rows["2"]
    # Closed without a reply leaves the compliance figures (as in the digest and stats), even
    # though the sweep had recorded its missed deadline in breached_at.
    assert (second["outcome"], second["breached"], second["close_reason"], second["owner"]) == (
        "closed_without_reply",
        "false",
        "spam",
        "maria",
    )
    assert (second["breached_at"], second["first_response_verdict"]) == ("2026-11-23T21:00:00Z", "not_judged")
    assert second["closed_at"] == "2026-11-24T04:00:00Z" and second["first_response_seconds"] == ""
    third = rows["3"]
    assert (third["outcome"], third["owner"], third["assigned_at"]) == ("open", "", "")
    assert third["author_handle"] == "=cmd|' /C calc'!A0"  # verbatim (see the module docstring)
    fourth = rows["4"]
    assert (fourth["outcome"], fourth["cycle"], fourth["breached"]) == ("closed_after_reply", "1", "true")
    assert fourth["first_response_seconds"] == "3600"
    for row in rows.values():
        for column in COLUMNS:
            if column.endswith("_at") and row[column]:
                assert row[column].endswith("Z")
                assert datetime.fromisoformat(row[column]).utcoffset() == timedelta(0)


def test_filters_since_until_and_team(four: Engine) -> None:
    def ids(**filters: Any) -> list[str]:
        return [row["conversation_id"] for row in export(four, **filters)]

    assert ids(since=T0) == ["1", "2", "3", "4"]
    assert ids(since=T0 + H) == ["2", "3", "4"]  # since is inclusive, on opened_at
    assert ids(since=T0, until=T0 + 24 * H) == ["1", "2"]  # until is exclusive
    assert ids(since=T0, team="billing") == ["2"]
    assert ids(since=T0, team="care", until=T0 + 25 * H) == ["1", "3"]
    assert ids(since=T0 + 100 * H) == []
    assert export(four, since=T0 + 100 * H) == []  # header only


def test_bounds_and_the_command(four: Engine) -> None:
    assert parse_bound("2026-11-23") == datetime(2026, 11, 23, tzinfo=UTC)
    assert parse_bound("2026-11-23", end=True) == datetime(2026, 11, 24, tzinfo=UTC)  # the whole day
    assert parse_bound("2026-11-23T09:00") == datetime(2026, 11, 23, 9, tzinfo=UTC)  # naive = UTC
    assert parse_bound("2026-11-23T09:00+01:00") == datetime(2026, 11, 23, 8, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_bound("last week")
    assert iso_utc(None) == "" and iso_utc(datetime(2026, 1, 1, 1, tzinfo=UTC)) == "2026-01-01T01:00:00Z"

    out, err = io.StringIO(), io.StringIO()
    with make_sessionmaker(four)() as session:
        status = export_command(session, since="2026-11-23", until="2026-11-23", out=out, err=err)
    assert status == 0
    assert [line.split(",")[0] for line in out.getvalue().splitlines()] == ["conversation_id", "1", "2"]
    assert err.getvalue() == "2 conversations exported\n"
    with make_sessionmaker(four)() as session:
        assert export_command(session, since="yesterday", out=out, err=err) == 2
        assert export_command(session, since="2026-11-24", until="2026-11-22", out=out, err=err) == 2
    assert "not an ISO date" in err.getvalue() and "is not after" in err.getvalue()


class CountingSink:
    """A file that only counts what is written (so the test measures the export, not the output)."""

    def __init__(self) -> None:
        self.characters = 0
        self.lines = 0

    def write(self, text: str) -> int:
        self.characters += len(text)
        self.lines += text.count("\n")
        return len(text)


def test_export_streams_in_bounded_memory(engine: Engine) -> None:
    size = 20_000
    seed(
        engine,
        (
            conversation_row(
                n,
                T0 + timedelta(minutes=n),
                status="answered",
                first_response_at=T0 + timedelta(minutes=n + 30),
                answered_at=T0 + timedelta(minutes=n + 30),
                answered_by="expert:sam",
                next_action_at=None,
            )
            for n in range(1, size + 1)
        ),
    )
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        rows = export_rows(session, since=T0)
        assert inspect.isgenerator(rows)  # nothing is read until iterated
        rows.close()

    def peak(action: Any) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            action()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    sink = CountingSink()

    def stream() -> None:
        with sessions() as session:
            write_export(session, sink, since=T0)  # type: ignore[arg-type]

    def load_a_quarter() -> None:
        with sessions() as session:
            held = list(itertools.islice(export_rows(session, since=T0), size // 4))
            assert len(held) == size // 4

    streaming, quarter = peak(stream), peak(load_a_quarter)
    assert sink.lines == size + 1
    # Streaming all 20,000 rows holds one batch of 1,000; it must take less than holding even a
    # quarter of them (loading all would take about four times that quarter).
    assert streaming < quarter, (streaming, quarter)
    assert streaming < 8_000_000, streaming
