"""After a storm: check that nothing was done twice or lost, and measure how late the ladder was.

Four independent records are compared:

* the database (posts, conversations, outbox rows, audit events);
* the Slack stand-in's call log: every request with the time its answer was ready;
* the reply endpoint's log: every acknowledgement the customers received;
* each process's JSON log lines ("sweep" with ``processed``, "outbox" with ``sent``).

Lateness of a ladder step = the time of its Slack call minus the step's scheduled time (the
outbox row's ``payload.scheduled_at``). The call is found by real correlation: the outbox row's
result holds the channel and ``ts`` Slack answered (``thread C… 1700000000.000100``, ``dm D… …``),
and exactly one recorded ``chat.postMessage`` answered with that channel and ``ts``. It splits
into the sweep's part (the ``events`` row's ``detail.lateness_seconds``: sweep time minus
scheduled time) and the sender's part (Slack call minus sweep time).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select

from bot.demo.standin import Call
from storage.models import Account, Conversation, Event, Outbox, Post
from tests.storm.loader import Outcome
from tests.storm.scenario import ACCOUNT, CHANNELS, EXPERTS, LADDER_KINDS, Schedule, StormConfig
from tests.storm.servers import Reply

CARD_METADATA_TYPE = "replyclock_card"
# An overdue digest's metadata: the breach and escalation notices it carries.
OVERDUE_METADATA_TYPE = "replyclock_overdue"
# A reminder digest's metadata: the nags (one person's, by DM) it carries.
REMINDER_METADATA_TYPE = "replyclock_reminders"
# A step is owed when it fell due at least this long before the conversation's answer arrived
# (closer to the answer, a prompt sweep may or may not have taken it: neither is wrong).
OWED_MARGIN = 2.0
# The notification text of each ladder message (bot.slack.blocks) -> its kind.
STEP_TEXTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("breach", re.compile(r"^Deadline missed: #(\d+) ")),
    ("nag", re.compile(r"^Reminder: #(\d+) ")),
    ("escalation", re.compile(r"^Escalation: #(\d+) ")),
    ("warning", re.compile(r"^#(\d+) is ")),
)


# A channel is "rate-limited" when in some POST_WINDOW seconds it took at least LIMITED_SHARE of
# what Slack's pace allows there (about one post a second): its messages had to queue.
POST_WINDOW = 10.0
LIMITED_SHARE = 0.8
URGENT_KINDS = ("breach", "escalation")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Spread:
    """Percentiles of a list of seconds."""

    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(len(values), percentile(values, 50), percentile(values, 99), max(values, default=math.nan))

    def __str__(self) -> str:
        return f"n={self.count:,} p50={self.p50:.3f}s p99={self.p99:.3f}s max={self.max:.3f}s"


@dataclass
class ProcessWork:
    """What one process's log lines say it did."""

    sweeps: int = 0  # sweep runs that processed something
    processed: int = 0  # conversations those sweeps processed
    ladder_steps: int = 0  # "ladder step" lines (outbox rows written by the sweep)
    outbox_runs: int = 0
    sent: int = 0  # outbox rows sent
    retried: int = 0
    cards: int = 0  # "card posted" lines (a card of its own, outside a storm summary)
    storm_summaries: int = 0
    storm_cards: int = 0  # cards posted as entries under this process's storm summaries
    overdue_digests: int = 0  # overdue digests posted ("overdue digest posted" lines)
    overdue_notices: int = 0  # breach and escalation notices those digests carried
    reminder_digests: int = 0  # reminder digests posted ("reminder digest posted" lines)
    reminder_nags: int = 0  # nags those digests carried
    errors: int = 0  # error-level lines
    warnings: int = 0

    @property
    def did_work(self) -> bool:
        return self.processed > 0 or self.sent > 0


@dataclass
class ChannelFigures:
    """What one Slack channel (a team's, or a person's DMs) received, and how late."""

    label: str
    posts: int = 0  # chat.postMessage calls answered ok
    refused: int = 0  # chat.postMessage calls answered 429
    peak: int = 0  # the most posts in any POST_WINDOW seconds
    span: float = 0.0  # seconds from its first post to its last
    urgent: list[float] = field(default_factory=list)  # breach and escalation: lateness, s
    cards: list[float] = field(default_factory=list)  # webhook 202 -> card (or storm entry), s
    warnings: list[float] = field(default_factory=list)
    nags: list[float] = field(default_factory=list)

    @property
    def limited(self) -> bool:
        return self.peak >= LIMITED_SHARE * POST_WINDOW


@dataclass
class Report:
    """Everything checked and measured; `problems` is empty when the storm went right."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    work: dict[str, ProcessWork] = field(default_factory=dict)
    lateness: dict[str, Spread] = field(default_factory=dict)  # "all" and per kind
    sweep_lateness: Spread | None = None
    send_delay: Spread | None = None
    card_latency: Spread | None = None  # webhook answered -> card posted
    ack_latency: Spread | None = None  # webhook answered -> acknowledgement received
    webhook_seconds: float = 0.0  # first request sent -> last answer
    webhook_accepted: int = 0
    outbox_sent: int = 0  # rows sent (or settled as skipped) by all the run processes
    outbox_seconds: float = 0.0  # first row written -> last row sent
    card_seconds: float = 0.0  # first card -> last card
    slack_calls: Counter[str] = field(default_factory=Counter)
    late_steps: list[tuple[float, str, int, str]] = field(default_factory=list)  # the latest few
    # (scheduled time, lateness, kind) of every sent step
    points: list[tuple[float, float, str]] = field(default_factory=list)
    owed_steps: int = 0  # steps due at least OWED_MARGIN before their conversation's answer arrived
    missing_steps: Counter[str] = field(default_factory=Counter)  # owed but never in Slack, by kind
    channels: dict[str, ChannelFigures] = field(default_factory=dict)  # by channel id
    sends: int = 0  # outbox rows settled as sent (a platform call, or a skip)
    skipped_sends: int = 0  # of those, skips: the handler found nothing to send (answered first...)

    @property
    def skip_share(self) -> float:
        return self.skipped_sends / self.sends if self.sends else 0.0

    def by_limit(self, limited: bool, what: str) -> Spread:
        """Lateness of `what` (urgent, cards, warnings, nags) over the channels (not) rate-limited."""
        values = [v for c in self.channels.values() if c.limited == limited for v in getattr(c, what)]
        return Spread.of(values)

    def problem(self, text: str) -> None:
        self.problems.append(text)


def process_work(logs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, ProcessWork]:
    """Per `run` process: what its JSON log lines say it did."""
    found: dict[str, ProcessWork] = {}
    for name, records in logs.items():
        if not name.startswith("run"):
            continue
        work = ProcessWork()
        for record in records:
            event = record.get("event")
            if event == "sweep":
                work.sweeps += 1
                work.processed += int(record.get("processed", 0))
            elif event == "ladder step":
                work.ladder_steps += 1
            elif event == "outbox":
                work.outbox_runs += 1
                work.sent += int(record.get("sent", 0))
                work.retried += int(record.get("retried", 0))
            elif event == "card posted":
                work.cards += 1
            elif event in ("storm summary posted", "storm digest posted"):
                work.storm_summaries += 1
                work.storm_cards += int(record.get("cards", 0))
            elif event == "overdue digest posted":
                work.overdue_digests += 1
                work.overdue_notices += int(record.get("notices", 0))
            elif event == "reminder digest posted":
                work.reminder_digests += 1
                work.reminder_nags += int(record.get("notices", 0))
            level = record.get("level")
            if level == "error":
                work.errors += 1
            elif level == "warning":
                work.warnings += 1
        found[name] = work
    return found


def _at(value: object) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


def analyse(
    engine: Engine,
    schedule: Schedule,
    outcomes: Sequence[Outcome],
    calls: Sequence[Call],
    replies: Sequence[Reply],
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    config: StormConfig,
) -> Report:
    """Check the storm's invariants and compute its figures."""
    report = Report()
    report.slack_calls = Counter(call.method for call in calls)
    with engine.connect() as db:
        account_id = db.scalar(select(Account.id).where(Account.name == ACCOUNT))
        posts = list(
            db.execute(
                select(Post.external_id, Post.direction, Post.conversation_id, Post.author_id).where(
                    Post.account_id == account_id
                )
            )
        )
        conversations = list(
            db.execute(
                select(
                    Conversation.id,
                    Conversation.author_id,
                    Conversation.status,
                    Conversation.slack_ts,
                    Conversation.due_at,
                )
            )
        )
        outbox = list(
            db.execute(
                select(
                    Outbox.id,
                    Outbox.kind,
                    Outbox.conversation_id,
                    Outbox.payload,
                    Outbox.status,
                    Outbox.result,
                    Outbox.attempts,
                    Outbox.created_at,
                    Outbox.sent_at,
                )
            )
        )
        events = list(
            db.execute(
                select(Event.conversation_id, Event.action, Event.at, Event.detail).where(
                    Event.action.in_(LADDER_KINDS)
                )
            )
        )

    _check_posts(report, schedule, outcomes, posts)
    by_author = _check_conversations(report, schedule, conversations)
    _check_outbox(report, outbox)
    _check_cards(report, conversations, calls)
    step_calls = _check_steps(report, outbox, events, calls)
    _check_acks(report, outbox, replies, by_author, posts)
    _measure(report, outcomes, calls, replies, posts, step_calls, events)
    _owed(report, config, schedule, outcomes, posts, conversations, step_calls)
    _channels(report, calls, posts, outcomes, step_calls)
    report.work = process_work(logs)
    runs = config.run_processes
    idle = [name for name, work in report.work.items() if not work.did_work]
    if len(report.work) != runs:
        report.problem(f"expected logs of {runs} run processes, found {sorted(report.work)}")
    if idle:
        report.problem(f"processes that did no sweep or outbox work: {', '.join(idle)}")
    return report


def _check_posts(
    report: Report, schedule: Schedule, outcomes: Sequence[Outcome], posts: Sequence[Any]
) -> None:
    failed = [o for o in outcomes if o.status != 202]
    if failed:
        codes = Counter(o.status for o in failed)
        report.problem(f"{len(failed)} webhook deliveries not accepted: {dict(codes)}")
    sent = len(schedule.deliveries)
    if len(outcomes) != sent:
        report.problem(f"{sent - len(outcomes)} deliveries never sent")
    report.webhook_accepted = sum(1 for o in outcomes if o.status == 202)
    report.counts["deliveries"] = sent
    report.counts["retried deliveries"] = sum(1 for o in outcomes if o.tries > 1)
    # Each external id in the posts table at most once (the unique key), and every one there.
    stored = Counter(row.external_id for row in posts)
    doubled = [external_id for external_id, n in stored.items() if n > 1]
    if doubled:
        report.problem(f"{len(doubled)} posts stored more than once, e.g. {doubled[:5]}")
    customer = {row.external_id for row in posts if row.direction == "in"}
    missing = set(schedule.customer_posts) - customer
    if missing:
        report.problem(f"{len(missing)} customer posts not stored, e.g. {sorted(missing)[:5]}")
    answers = {row.external_id for row in posts if row.direction == "out"}
    missing_answers = set(schedule.answers) - answers
    if missing_answers:
        report.problem(f"{len(missing_answers)} staff answers not stored")
    unlinked = [row.external_id for row in posts if row.direction == "in" and row.conversation_id is None]
    if unlinked:
        report.problem(f"{len(unlinked)} customer posts in no conversation")
    report.counts["customer posts stored"] = len(customer)
    # A delivery sent twice is answered as a duplicate exactly once (whichever came second).
    firsts: dict[str, int] = Counter()
    for outcome in outcomes:
        if outcome.status == 202 and outcome.duplicate is False:
            firsts[outcome.delivery.external_id] += 1
    twice = [external_id for external_id, n in firsts.items() if n > 1]
    if twice:
        report.problem(f"{len(twice)} deliveries accepted as new more than once, e.g. {twice[:5]}")
    report.counts["duplicate deliveries"] = sum(1 for d in schedule.deliveries if d.duplicate)


def _check_conversations(report: Report, schedule: Schedule, conversations: Sequence[Any]) -> dict[str, int]:
    by_author: dict[str, list[int]] = defaultdict(list)
    for row in conversations:
        by_author[row.author_id].append(row.id)
    doubled = {author: ids for author, ids in by_author.items() if len(ids) > 1}
    if doubled:
        report.problem(
            f"{len(doubled)} authors with more than one conversation, e.g. {list(doubled.items())[:3]}"
        )
    if len(conversations) != schedule.conversations:
        report.problem(f"{len(conversations)} conversations, expected {schedule.conversations}")
    still_open = [row.id for row in conversations if row.status != "answered"]
    if still_open:
        report.problem(f"{len(still_open)} conversations not answered at the end, e.g. {still_open[:5]}")
    report.counts["conversations"] = len(conversations)
    return {author: ids[0] for author, ids in by_author.items()}


def _check_outbox(report: Report, outbox: Sequence[Any]) -> None:
    statuses = Counter((row.kind, row.status) for row in outbox)
    for (kind, status), n in sorted(statuses.items()):
        report.counts[f"outbox {kind} {status}"] = n
        if status not in ("sent", "retired"):  # retired: answered first, or a newer card update
            report.problem(f"{n} {kind} outbox rows left {status}")
    sent_at = [row.sent_at for row in outbox if row.status == "sent" and row.sent_at is not None]
    report.outbox_sent = len(sent_at)
    if sent_at:
        report.outbox_seconds = max(sent_at).timestamp() - min(row.created_at for row in outbox).timestamp()
    sent_rows = [row for row in outbox if row.status == "sent"]
    report.sends = len(sent_rows)
    report.skipped_sends = sum(1 for row in sent_rows if str(row.result).startswith("skipped"))
    report.counts["sends that were skips"] = report.skipped_sends
    report.counts["outbox rows sent more than once (attempts > 1)"] = sum(
        1 for row in outbox if row.attempts > 1
    )


def card_ids(metadata: dict[str, Any]) -> list[int]:
    """The conversations a card message stands for: one (a card, a storm entry) or a storm digest's."""
    payload = metadata.get("event_payload") or {}
    if "conversation_ids" in payload:
        return [int(cid) for cid in payload["conversation_ids"]]
    return [int(payload["conversation_id"])]


def _check_cards(report: Report, conversations: Sequence[Any], calls: Sequence[Call]) -> None:
    cards: Counter[int] = Counter()
    for call in calls:
        if call.method != "chat.postMessage" or not call.ok:
            continue
        metadata = call.params.get("metadata")
        if isinstance(metadata, dict) and metadata.get("event_type") == CARD_METADATA_TYPE:
            for cid in card_ids(metadata):
                cards[cid] += 1
    doubled = {cid: n for cid, n in cards.items() if n > 1}
    if doubled:
        report.problem(
            f"{len(doubled)} conversations with more than one card, e.g. {list(doubled.items())[:5]}"
        )
    missing = [row.id for row in conversations if cards[row.id] == 0]
    if missing:
        report.problem(f"{len(missing)} conversations without a card, e.g. {missing[:5]}")
    unstored = [row.id for row in conversations if row.slack_ts is None]
    if unstored:
        report.problem(f"{len(unstored)} conversations whose card ts was not stored")
    report.counts["cards posted"] = sum(cards.values())


def _result_key(result: str | None) -> tuple[str, str] | None:
    """(channel, ts) from an outbox result such as ``thread C0X 1700000000.000100``."""
    if not result or result.startswith("skipped"):
        return None
    parts = result.split()
    if len(parts) >= 3 and parts[0] in ("thread", "dm"):
        return parts[1], parts[2]
    if len(parts) >= 4 and parts[:2] in (["overdue", "digest"], ["reminder", "digest"]):
        return parts[2], parts[3]
    return None


def _check_steps(
    report: Report, outbox: Sequence[Any], events: Sequence[Any], calls: Sequence[Call]
) -> dict[int, tuple[Call, Any]]:
    """Every ladder step once in the events, once in the outbox, once in Slack.

    Returns outbox id -> (its Slack call, its outbox row) for the sent steps.
    """
    # Events: one per (conversation, kind, index) in the one cycle each conversation has.
    seen = Counter((row.conversation_id, row.action, row.detail.get("index")) for row in events)
    report.counts["ladder steps written"] = len(events)
    doubled_events = [key for key, n in seen.items() if n > 1]
    if doubled_events:
        report.problem(f"{len(doubled_events)} ladder steps recorded twice, e.g. {doubled_events[:5]}")
    # Slack: every step message, by the conversation and kind its text names.
    posted: dict[tuple[str, str], Call] = {}
    digests: set[tuple[str, str]] = set()  # overdue and reminder digests: one message, many rows
    slack_steps: Counter[tuple[int, str]] = Counter()
    for call in calls:
        if call.method != "chat.postMessage" or not call.ok or call.response is None:
            continue
        message = (str(call.response.get("channel")), str(call.response.get("ts")))
        posted[message] = call
        metadata = call.params.get("metadata")
        if isinstance(metadata, dict) and metadata.get("event_type") in (
            OVERDUE_METADATA_TYPE,
            REMINDER_METADATA_TYPE,
        ):
            # One message for several conversations' notices: each counts as its step in Slack.
            digests.add(message)
            for kind, listed in (metadata.get("event_payload") or {}).items():
                for cid in listed:
                    slack_steps[(int(cid), str(kind))] += 1
            continue
        text = str(call.params.get("text", ""))
        for kind, pattern in STEP_TEXTS:
            match = pattern.match(text)
            if match:
                slack_steps[(int(match.group(1)), kind)] += 1
                break
    sent_steps: Counter[tuple[int, str]] = Counter()
    matched: dict[int, tuple[Call, Any]] = {}
    used: Counter[tuple[str, str]] = Counter()
    unmatched = 0
    skipped = 0
    for row in outbox:
        if row.kind in LADDER_KINDS and row.status == "retired":
            skipped += 1  # answered before its turn: retired in the answer's transaction, never sent
            continue
        if row.kind not in LADDER_KINDS or row.status != "sent":
            continue
        key = _result_key(row.result)
        if key is None:
            skipped += 1
            continue
        sent_steps[(row.conversation_id, row.kind)] += 1
        found = posted.get(key)
        if found is None:
            unmatched += 1
            continue
        used[key] += 1
        matched[row.id] = (found, row)
    if unmatched:
        report.problem(f"{unmatched} sent ladder rows whose Slack message is not in the stand-in's log")
    if any(n > 1 for key, n in used.items() if key not in digests):
        report.problem("one Slack message claimed by two outbox rows")
    mismatched = {
        key: (slack_steps[key], sent_steps[key])
        for key in set(slack_steps) | set(sent_steps)
        if slack_steps[key] != sent_steps[key]
    }
    if mismatched:
        report.problem(
            f"{len(mismatched)} (conversation, step) pairs where Slack messages != sent outbox rows "
            f"(slack, rows), e.g. {sorted(mismatched.items())[:5]}"
        )
    for kind in ("warning", "breach", "escalation"):
        many = [cid for (cid, k), n in slack_steps.items() if k == kind and n > 1]
        if many:
            report.problem(f"{len(many)} conversations with more than one {kind} in Slack, e.g. {many[:5]}")
    for kind in LADDER_KINDS:
        report.counts[f"slack {kind} messages"] = sum(n for (_, k), n in slack_steps.items() if k == kind)
    report.counts["ladder rows skipped (answered before the send)"] = skipped
    return matched


def _check_acks(
    report: Report,
    outbox: Sequence[Any],
    replies: Sequence[Reply],
    by_author: Mapping[str, int],
    posts: Sequence[Any],
) -> None:
    per_post = Counter(reply.in_reply_to for reply in replies)
    per_author = Counter(reply.author_id for reply in replies)
    doubled_posts = [p for p, n in per_post.items() if n > 1]
    doubled_authors = [a for a, n in per_author.items() if n > 1]
    if doubled_posts:
        report.problem(f"{len(doubled_posts)} posts acknowledged more than once, e.g. {doubled_posts[:5]}")
    if doubled_authors:
        report.problem(
            f"{len(doubled_authors)} customers acknowledged more than once, e.g. {doubled_authors[:5]}"
        )
    conversation_of = {row.external_id: row.conversation_id for row in posts}
    per_conversation = Counter(conversation_of.get(reply.in_reply_to or "") for reply in replies)
    doubled_conversations = [c for c, n in per_conversation.items() if n > 1]
    if doubled_conversations:
        report.problem(f"{len(doubled_conversations)} conversations acknowledged more than once")
    acks = [row for row in outbox if row.kind == "ack"]
    sent = {row.result for row in acks if row.status == "sent" and not str(row.result).startswith("skipped")}
    received = {reply.id for reply in replies}
    if sent != received:
        report.problem(
            f"acknowledgements: {len(sent)} sent by the outbox, {len(received)} received "
            f"({len(sent - received)} sent but not received, {len(received - sent)} received but not recorded)"
        )
    unacknowledged = [author for author in by_author if per_author[author] == 0]
    report.counts["acknowledgements received"] = len(replies)
    report.counts["acknowledgements skipped (answered first)"] = sum(
        1 for row in acks if row.status == "sent" and str(row.result).startswith("skipped")
    )
    report.counts["customers without an acknowledgement"] = len(unacknowledged)
    if len(acks) != len(by_author):
        report.problem(f"{len(acks)} ack rows for {len(by_author)} conversations")


def _measure(
    report: Report,
    outcomes: Sequence[Outcome],
    calls: Sequence[Call],
    replies: Sequence[Reply],
    posts: Sequence[Any],
    step_calls: Mapping[int, tuple[Call, Any]],
    events: Sequence[Any],
) -> None:
    accepted = [o for o in outcomes if o.status == 202]
    if accepted:
        report.webhook_seconds = max(o.done for o in accepted) - min(o.sent for o in accepted)
    # When each customer post was answered 202 (the first time).
    answered_at: dict[str, float] = {}
    for outcome in accepted:
        if outcome.delivery.kind == "post":
            previous = answered_at.get(outcome.delivery.external_id)
            answered_at[outcome.delivery.external_id] = min(outcome.done, previous or math.inf)
    first_post: dict[int, str] = {}
    for row in posts:
        if row.direction == "in" and row.external_id in answered_at and row.conversation_id is not None:
            first_post.setdefault(row.conversation_id, row.external_id)
    card_times: dict[int, float] = {}
    for call in calls:
        metadata = call.params.get("metadata") if call.method == "chat.postMessage" and call.ok else None
        if isinstance(metadata, dict) and metadata.get("event_type") == CARD_METADATA_TYPE:
            for cid in card_ids(metadata):
                card_times.setdefault(cid, call.timestamp)
    if card_times:
        report.card_seconds = max(card_times.values()) - min(card_times.values())
    report.card_latency = Spread.of(
        [t - answered_at[first_post[cid]] for cid, t in card_times.items() if cid in first_post]
    )
    report.ack_latency = Spread.of(
        [r.timestamp - answered_at[r.in_reply_to] for r in replies if r.in_reply_to in answered_at]
    )

    swept: dict[tuple[int, str, int], tuple[float, float]] = {}
    for row in events:
        index = row.detail.get("index")
        if isinstance(index, int):
            swept[(row.conversation_id, row.action, index)] = (
                _at(row.at),
                float(row.detail.get("lateness_seconds", math.nan)),
            )
    by_kind: dict[str, list[float]] = defaultdict(list)
    everything: list[float] = []
    sweep_part: list[float] = []
    send_part: list[float] = []
    late: list[tuple[float, str, int, str]] = []
    for call, row in step_calls.values():
        scheduled = _at(row.payload["scheduled_at"])
        lateness = call.timestamp - scheduled
        by_kind[row.kind].append(lateness)
        everything.append(lateness)
        late.append((lateness, row.kind, row.conversation_id, row.payload["scheduled_at"]))
        report.points.append((scheduled, lateness, row.kind))
        sweep = swept.get((row.conversation_id, row.kind, int(row.payload.get("index", -1))))
        if sweep is not None:
            sweep_part.append(sweep[1])
            send_part.append(call.timestamp - sweep[0])
    report.lateness["all"] = Spread.of(everything)
    for kind in LADDER_KINDS:
        if by_kind.get(kind):
            report.lateness[kind] = Spread.of(by_kind[kind])
    report.sweep_lateness = Spread.of(sweep_part)
    report.send_delay = Spread.of(send_part)
    report.late_steps = sorted(late, reverse=True)[:5]


def _owed(
    report: Report,
    config: StormConfig,
    schedule: Schedule,
    outcomes: Sequence[Outcome],
    posts: Sequence[Any],
    conversations: Sequence[Any],
    step_calls: Mapping[int, tuple[Call, Any]],
) -> None:
    """Count the steps the ladder owed (due well before the answer arrived) that never reached Slack.

    A sweep that comes late merges nags (one for several missed slots) and drops a warning
    whose moment passed before the deadline; a sender that comes late finds the conversation
    answered and skips the step. Lateness is measured on the steps that were sent, so these
    are counted apart.
    """
    conversation_of = {row.external_id: row.conversation_id for row in posts}
    answered: dict[int, float] = {}
    for outcome in outcomes:
        if outcome.delivery.kind == "answer" and outcome.status == 202:
            cid = conversation_of.get(schedule.answers[outcome.delivery.external_id])
            if cid is not None:
                answered[cid] = min(outcome.done, answered.get(cid, math.inf))
    sent = {
        (row.conversation_id, row.kind, int(row.payload.get("index", -1)))
        for _call, row in step_calls.values()
    }
    for row in conversations:
        until = answered.get(row.id)
        if until is None:
            continue
        due = _at(row.due_at)
        owed: list[tuple[str, int, float]] = [
            ("warning", 0, due - (1 - config.warn_at) * config.first_response),
            ("breach", 0, due),
            ("escalation", 0, due + config.escalation_after),
        ]
        slot = 1
        while config.nag_every > 0 and due + slot * config.nag_every < until:
            owed.append(("nag", slot, due + slot * config.nag_every))
            slot += 1
        for kind, index, at in owed:
            if at <= until - OWED_MARGIN:
                report.owed_steps += 1
                if (row.id, kind, index) not in sent:
                    report.missing_steps[kind] += 1


def _answered_at(outcomes: Sequence[Outcome], posts: Sequence[Any]) -> dict[int, float]:
    """Conversation id -> when the webhook first answered 202 for its first customer post."""
    accepted: dict[str, float] = {}
    for outcome in outcomes:
        if outcome.status == 202 and outcome.delivery.kind == "post":
            previous = accepted.get(outcome.delivery.external_id, math.inf)
            accepted[outcome.delivery.external_id] = min(outcome.done, previous)
    found: dict[int, float] = {}
    for row in posts:
        if row.direction == "in" and row.external_id in accepted and row.conversation_id is not None:
            found.setdefault(row.conversation_id, accepted[row.external_id])
    return found


def _channels(
    report: Report,
    calls: Sequence[Call],
    posts: Sequence[Any],
    outcomes: Sequence[Outcome],
    step_calls: Mapping[int, tuple[Call, Any]],
) -> None:
    """Per Slack channel: posts, 429s, its busiest POST_WINDOW, and the lateness of what it got."""
    labels = {channel: team for team, channel in CHANNELS.items()}
    names = {slack_id: name for name, slack_id in EXPERTS.values()}
    times: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        if call.method == "conversations.open" and call.ok and call.response is not None:
            channel = (call.response.get("channel") or {}).get("id")
            user = str(call.params.get("users", ""))
            if channel:
                labels.setdefault(str(channel), f"DM {names.get(user, user)}")
        if call.method != "chat.postMessage":
            continue
        if call.ok and call.response is not None:
            times[str(call.response.get("channel"))].append(call.timestamp)
        elif call.status == 429:
            channel = str(call.params.get("channel"))
            figures = report.channels.setdefault(channel, ChannelFigures(labels.get(channel, channel)))
            figures.refused += 1
    for channel, stamps in times.items():
        figures = report.channels.setdefault(channel, ChannelFigures(labels.get(channel, channel)))
        figures.label = labels.get(channel, channel)
        stamps.sort()
        figures.posts = len(stamps)
        figures.span = stamps[-1] - stamps[0]
        start = 0
        for end, at in enumerate(stamps):
            while at - stamps[start] >= POST_WINDOW:
                start += 1
            figures.peak = max(figures.peak, end - start + 1)
    for call, row in step_calls.values():
        channel = str((call.response or {}).get("channel"))
        figures = report.channels.setdefault(channel, ChannelFigures(labels.get(channel, channel)))
        lateness = call.timestamp - _at(row.payload["scheduled_at"])
        if row.kind in URGENT_KINDS:
            figures.urgent.append(lateness)
        elif row.kind == "warning":
            figures.warnings.append(lateness)
        elif row.kind == "nag":
            figures.nags.append(lateness)
    answered = _answered_at(outcomes, posts)
    seen: set[int] = set()
    for call in calls:
        metadata = call.params.get("metadata") if call.method == "chat.postMessage" and call.ok else None
        if not isinstance(metadata, dict) or metadata.get("event_type") != CARD_METADATA_TYPE:
            continue
        for cid in card_ids(metadata):
            if cid in seen or cid not in answered:
                continue
            seen.add(cid)
            channel = str((call.response or {}).get("channel"))
            figures = report.channels.setdefault(channel, ChannelFigures(labels.get(channel, channel)))
            figures.cards.append(call.timestamp - answered[cid])


def timeline(
    points: Iterable[tuple[float, float, str]], start: float, bucket: float = 15.0
) -> list[tuple[float, Spread]]:
    """Lateness by when the steps were due: (seconds after `start`, Spread) per `bucket` seconds."""
    buckets: dict[int, list[float]] = defaultdict(list)
    for scheduled, lateness, _kind in points:
        buckets[int((scheduled - start) // bucket)].append(lateness)
    return [(key * bucket, Spread.of(values)) for key, values in sorted(buckets.items())]
