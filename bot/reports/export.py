"""CSV export of conversations: one row per conversation, every timestamp, streamed.

``replyclock export --since D [--until D] [--team T]`` writes to stdout. The rows are the
conversations *opened* in ``[since, until)``, ordered by id, optionally of one team.

Columns, in this order (the order is part of the interface: add new columns at the end):

==========================  =====================================================================
``conversation_id``         the conversation's id
``team``                    team it was routed to
``account``                 connector account name
``priority``                low, normal, high or urgent
``policy``                  SLA policy name
``route_rule``              routing rule that matched (empty: default team)
``status``                  open, answered or closed (now)
``outcome``                 open, answered, closed_after_reply or closed_without_reply
``breached``                true if its first-response deadline or its current cycle's deadline
                            was missed (`bot.core.sla_outcome`, as the digest and stats judge it,
                            whether or not a sweep announced it), or a sweep recorded a breach
                            of an earlier cycle (``breached_at`` set on an answered conversation)
``owner``                   expert id of the owner
``claimed_by``              expert who claimed it
``answered_by``             who gave the latest answer (``expert:<id>``, ``account:<handle>``...)
``close_reason``            why staff closed it
``cycle``                   0 = first response; n = n-th customer follow-up after an answer
``author_id``               customer's platform id
``author_handle``           customer's handle (verbatim)
``opened_at``               the customer's first post
``clock_started_at``        when the current cycle's SLA clock started (next opening, on business time)
``assigned_at``             when the current owner got it
``claimed_at``              when it was claimed
``acknowledged_at``         when the automatic acknowledgement was queued
``cycle_started_at``        start of the current cycle
``last_customer_post_at``   the customer's latest post
``due_at``                  deadline of the current cycle
``first_response_at``       first human response
``answered_at``             answer of the current cycle
``breached_at``             first missed deadline
``closed_at``               when staff closed it
``first_response_seconds``  ``first_response_at - opened_at`` in seconds (wall time)
``first_due_at``            the first-response deadline the customer was promised
``first_response_verdict``  ``within``, ``breached``, ``pending`` or ``not_judged`` (closed
                            without reply), at the time of the export; empty for rows from
                            before migration 0004 already past their first cycle
``late_by_seconds``         how late the first response was (so far, if still unanswered)
``resolution_due_at``       the resolution target (policy ``resolution``), moved on by waits
``resolution_verdict``      ``within``, ``breached``, ``pending`` or ``not_judged`` (resolved =
                            closed after an answer); empty without a resolution target
``waiting_since``           since when staff wait on the customer (clocks paused), else empty
==========================  =====================================================================

Times are ISO 8601 in UTC with a ``Z`` suffix (``2026-11-23T08:00:00Z``; fractional seconds
only when stored), empty when unset. The first line is the header; lines end in ``\\n``.
Values are written verbatim (a handle such as ``@ana`` or ``=cmd`` is data, not a formula:
import the file into a spreadsheet rather than opening it by double-click).

Memory stays flat however many rows: the query is streamed with ``yield_per`` (a server-side
cursor on PostgreSQL, SQLite's lazy cursor otherwise) and each row is written as it arrives.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, TextIO

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from bot.core.sla_outcome import resolution_outcome, sla_outcome
from storage.models import CLOSED, OPEN, Account, Conversation

COLUMNS: tuple[str, ...] = (
    "conversation_id",
    "team",
    "account",
    "priority",
    "policy",
    "route_rule",
    "status",
    "outcome",
    "breached",
    "owner",
    "claimed_by",
    "answered_by",
    "close_reason",
    "cycle",
    "author_id",
    "author_handle",
    "opened_at",
    "clock_started_at",
    "assigned_at",
    "claimed_at",
    "acknowledged_at",
    "cycle_started_at",
    "last_customer_post_at",
    "due_at",
    "first_response_at",
    "answered_at",
    "breached_at",
    "closed_at",
    "first_response_seconds",
    "first_due_at",
    "first_response_verdict",
    "late_by_seconds",
    "resolution_due_at",
    "resolution_verdict",
    "waiting_since",
)
BATCH = 1000


def iso_utc(value: datetime | None) -> str:
    """``2026-11-23T08:00:00Z``; empty for None."""
    if value is None:
        return ""
    if value.tzinfo is not UTC:  # storage.types hands back UTC already; others may not
        value = value.astimezone(UTC)
    return value.isoformat().replace("+00:00", "Z")


def _seconds(value: timedelta) -> str:
    seconds = value.total_seconds()
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:.6f}".rstrip("0")


def _outcome(status: str, first_response_at: datetime | None) -> str:
    if status == CLOSED:
        return "closed_without_reply" if first_response_at is None else "closed_after_reply"
    return "open" if status == OPEN else "answered"


def export_query(
    *, since: datetime, until: datetime | None = None, team: str | None = None
) -> Select[*tuple[Any, ...]]:
    """The conversations opened in ``[since, until)`` (of `team`), oldest id first, as plain columns."""
    query = (
        select(
            Conversation.id,
            Conversation.team,
            Account.name,
            Conversation.priority,
            Conversation.policy,
            Conversation.route_rule,
            Conversation.status,
            Conversation.owner,
            Conversation.claimed_by,
            Conversation.answered_by,
            Conversation.close_reason,
            Conversation.cycle,
            Conversation.author_id,
            Conversation.author_handle,
            Conversation.opened_at,
            Conversation.clock_started_at,
            Conversation.assigned_at,
            Conversation.claimed_at,
            Conversation.acknowledged_at,
            Conversation.cycle_started_at,
            Conversation.last_customer_post_at,
            Conversation.due_at,
            Conversation.first_response_at,
            Conversation.answered_at,
            Conversation.breached_at,
            Conversation.closed_at,
            Conversation.first_due_at,
            Conversation.resolution_due_at,
            Conversation.waiting_since,
        )
        .join(Account, Account.id == Conversation.account_id)
        .where(Conversation.opened_at >= since)
        .order_by(Conversation.id)
    )
    if until is not None:
        query = query.where(Conversation.opened_at < until)
    if team is not None:
        query = query.where(Conversation.team == team)
    return query


def export_rows(
    session: Session,
    *,
    since: datetime,
    until: datetime | None = None,
    team: str | None = None,
    now: datetime | None = None,
) -> Iterator[list[str]]:
    """Yield one CSV row (strings, in `COLUMNS` order) per conversation, streaming from the database.

    A generator: nothing is read until it is iterated, and at most `BATCH` rows are held at once.
    `now` (default: the current time) is when unanswered deadlines are judged.
    """
    at = now if now is not None else datetime.now(UTC)
    result = session.execute(
        export_query(since=since, until=until, team=team).execution_options(yield_per=BATCH)
    )
    for (
        conversation_id,
        team_name,
        account,
        priority,
        policy,
        route_rule,
        status,
        owner,
        claimed_by,
        answered_by,
        close_reason,
        cycle,
        author_id,
        author_handle,
        opened_at,
        clock_started_at,
        assigned_at,
        claimed_at,
        acknowledged_at,
        cycle_started_at,
        last_customer_post_at,
        due_at,
        first_response_at,
        answered_at,
        breached_at,
        closed_at,
        first_due_at,
        resolution_due_at,
        waiting_since,
    ) in result:
        first_due = first_due_at if first_due_at is not None else (due_at if cycle == 0 else None)
        first = (
            sla_outcome(due_at=first_due, responded_at=first_response_at, closed_at=closed_at, now=at)
            if first_due is not None
            else None
        )
        # While waiting on the customer the cycle's clock stands still.
        current = sla_outcome(
            due_at=due_at,
            responded_at=answered_at,
            closed_at=closed_at,
            now=min(at, waiting_since) if waiting_since is not None else at,
        )
        resolution = (
            resolution_outcome(
                resolution_due_at=resolution_due_at,
                first_response_at=first_response_at,
                closed_at=closed_at,
                waiting_since=waiting_since,
                now=at,
            )
            if resolution_due_at is not None
            else None
        )
        breached = (
            (first is not None and first.breached)
            or current.breached
            or (breached_at is not None and first_response_at is not None)
        )
        yield [
            str(conversation_id),
            team_name,
            account,
            priority,
            policy,
            route_rule or "",
            status,
            _outcome(status, first_response_at),
            "true" if breached else "false",
            owner or "",
            claimed_by or "",
            answered_by or "",
            close_reason or "",
            str(cycle),
            author_id,
            author_handle or "",
            iso_utc(opened_at),
            iso_utc(clock_started_at),
            iso_utc(assigned_at),
            iso_utc(claimed_at),
            iso_utc(acknowledged_at),
            iso_utc(cycle_started_at),
            iso_utc(last_customer_post_at),
            iso_utc(due_at),
            iso_utc(first_response_at),
            iso_utc(answered_at),
            iso_utc(breached_at),
            iso_utc(closed_at),
            _seconds(first_response_at - opened_at) if first_response_at is not None else "",
            iso_utc(first_due),
            first.verdict if first is not None else "",
            _seconds(first.late_by) if first is not None else "",
            iso_utc(resolution_due_at),
            resolution.verdict if resolution is not None else "",
            iso_utc(waiting_since),
        ]


def write_export(
    session: Session,
    out: TextIO,
    *,
    since: datetime,
    until: datetime | None = None,
    team: str | None = None,
    now: datetime | None = None,
) -> int:
    """Write the header and every row to `out` as they stream in; returns the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for row in export_rows(session, since=since, until=until, team=team, now=now):
        writer.writerow(row)
        count += 1
    return count


def parse_bound(text: str, *, end: bool = False) -> datetime:
    """A ``--since``/``--until`` value as a UTC instant.

    A date (``2026-11-01``) means that day in UTC: its start for ``--since``, and the start of
    the next day for ``--until`` (``end=True``), so ``--since 2026-11-01 --until 2026-11-30``
    covers all of November. A date-time is taken as given (naive ones are UTC); ``--until`` is
    exclusive.

    Raises:
        ValueError: neither an ISO date nor an ISO date-time.
    """
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day + timedelta(days=1 if end else 0), time(), tzinfo=UTC)
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO date or date-time: {text!r} (use e.g. 2026-11-01)") from None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def export_command(
    session: Session,
    *,
    since: str,
    until: str | None = None,
    team: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``replyclock export --since D [--until D] [--team T]``: CSV to `out`; returns the exit status.

    `out` and `err` default to stdout and stderr.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        start = parse_bound(since)
        stop = parse_bound(until, end=True) if until else None
    except ValueError as error:
        print(f"error: {error}", file=err)
        return 2
    if stop is not None and stop <= start:
        print(f"error: --until {until} is not after --since {since}", file=err)
        return 2
    try:
        count = write_export(session, out, since=start, until=stop, team=team)
        out.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as Unix tools do, and keep Python from
        # complaining again when it flushes stdout at exit.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"{count} conversations exported", file=err)
    return 0
