"""What must hold after any number of kills: read from the database and the stand-ins' records.

`check` returns the violations (an empty list when all is well) and the figures of the run.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot.demo.standin import SlackStandIn
from bot.flow.outbox import CUSTOMER_KINDS
from storage.models import (
    ANSWERED,
    FAILED,
    PENDING,
    RETIRED,
    SENDING,
    SENT,
    UNKNOWN,
    Conversation,
    Event,
    Outbox,
    Post,
)
from tests.crash.harness import FinalState
from tests.crash.story import IGNORED, OUR_ID, RETWEET, STOP, Story
from tests.crash.xstandin import CrashX

LADDER_KINDS = ("warning", "breach", "escalation", "nag", "reassign")
LADDER_KEY = re.compile(r"conv:(\d+):c(\d+):(\w+):(\d+)")
# Ladder rows retired (their conversation answered first) after waiting longer than this: counted,
# and a failure for breach and escalation.
RETIRE_WITHIN = 15.0  # seconds
# Interrupted staff rows (a kill left them `sending`) must be sent this soon after they were due (p99).
INTERRUPTED_P99 = 15.0  # seconds
WHERE = re.compile(r"^(?:thread|dm) (\S+) (\S+)$")


# Known product bugs the harness detects, by code (see tests/test_crash.py, KNOWN_PRODUCT_BUGS).
FOLLOW_UP_FIRST = "follow-up-stored-before-answer"
ACK_BEFORE_OLDER_STOP = "ack-before-older-stop"
INGEST_STALE_CONVERSATION = "ingest-stale-conversation"
SIGTERM_DEADLOCK = "sigterm-deadlock"


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    known: dict[str, list[str]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, message: str) -> None:
        self.violations.append(message)

    def known_bug(self, code: str, message: str) -> None:
        self.known.setdefault(code, []).append(message)


def check(
    session: Session,
    *,
    x: CrashX,
    slack: SlackStandIn,
    story: Story,
    final: FinalState,
    customer_in_flight: set[int],
) -> Findings:
    found = Findings()
    posts = list(session.scalars(select(Post)))
    conversations = {c.id: c for c in session.scalars(select(Conversation))}
    outbox = list(session.scalars(select(Outbox).order_by(Outbox.id)))
    events = list(session.scalars(select(Event)))
    _posts_once(found, posts, x, story)
    _ladder(found, outbox, events, conversations, slack, final)
    _customer_messages(found, outbox, posts, x, story)
    _unknown_shown(found, outbox, events, slack)
    unknown = {row.id for row in outbox if row.status == UNKNOWN}
    if unknown != customer_in_flight:
        found.fail(
            "the customer messages of unknown fate are not exactly those a kill left in flight: "
            f"unknown only {sorted(unknown - customer_in_flight)}, "
            f"in flight only {sorted(customer_in_flight - unknown)}"
        )
    _settled(found, outbox, conversations, posts, story)
    found.figures["threads waiting on us whose conversation was not open before the final answers"] = len(
        final.unanswered_threads
    )
    return found


def check_stop(found: Findings, stacks: str | None) -> None:
    """The final run stopped on SIGTERM (else `stacks` holds what it was stuck in)."""
    if stacks is None:
        return
    if "in stop" in stacks and "concurrent/futures/thread.py" in stacks and "in shutdown" in stacks:
        found.known_bug(
            SIGTERM_DEADLOCK, "the final run hung on SIGTERM in its signal handler:\n" + stacks[-3000:]
        )
    else:
        found.fail("the final run did not stop on SIGTERM:\n" + stacks[-3000:])


def check_logs(found: Findings, logs: list[Path]) -> None:
    """No process logged an error (a SIGKILL leaves no trace in its own log; a restart must not either)."""
    errors = 0
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("level") not in ("error", "critical"):
                continue
            errors += 1
            trace = str(record.get("exception", ""))
            last = trace.strip().splitlines()[-1] if trace.strip() else ""
            where = f"{path.name} {record.get('ts')}: {record.get('event')}: {last[:300]}"
            if "StaleDataError" in last and "ingest_batch" in trace:
                found.known_bug(INGEST_STALE_CONVERSATION, where)
            else:
                found.fail(f"error logged: {where}")
    found.figures["errors logged"] = errors


def _posts_once(found: Findings, posts: list[Post], x: CrashX, story: Story) -> None:
    """Every tweet X served is stored exactly once (a retweet not at all); nothing else comes in."""
    roles = story.roles()
    stored = Counter(p.external_id for p in posts)
    for tweet_id in x.published:
        expected = 0 if roles.get(tweet_id) == RETWEET else 1
        if stored[tweet_id] != expected:
            found.fail(
                f"tweet {tweet_id} ({roles.get(tweet_id, 'final answer')}) stored {stored[tweet_id]} times"
            )
    created = {p.created_id for p in x.posts}
    strays = [
        p.external_id for p in posts if p.external_id not in x.published and p.external_id not in created
    ]
    if strays:
        found.fail(f"posts stored that X never served nor created: {strays[:5]}")
    served_ids = {i for page in x.pages for i in page.ids}
    found.figures["tweets published"] = len(x.published)
    found.figures["tweets served (distinct)"] = len(served_ids)
    found.figures["tweets served (with repeats)"] = sum(len(page.ids) for page in x.pages)
    found.figures["mentions pages served"] = len(x.pages)
    found.figures["posts stored"] = len(posts)


def _ladder(
    found: Findings,
    outbox: list[Outbox],
    events: list[Event],
    conversations: dict[int, Conversation],
    slack: SlackStandIn,
    final: FinalState,
) -> None:
    """Each (conversation, cycle, step, index) once, with one audit event; the expected ones all there."""
    rows = [row for row in outbox if row.kind in LADDER_KINDS]
    steps: Counter[tuple[int, int, str, int]] = Counter()
    row_steps: Counter[tuple[int, str, int, str]] = Counter()
    for row in rows:
        match = LADDER_KEY.fullmatch(row.idempotency_key)
        if match is None or match.group(3) != row.kind:
            found.fail(f"ladder row {row.id} has an unexpected key {row.idempotency_key!r}")
            continue
        cid, cycle, kind, index = int(match[1]), int(match[2]), match[3], int(match[4])
        steps[(cid, cycle, kind, index)] += 1
        row_steps[(cid, kind, index, str(row.payload.get("scheduled_at")))] += 1
    acted = Counter(
        (e.conversation_id or 0, e.action, int(e.detail["index"]), str(e.detail.get("scheduled_at")))
        for e in events
        if e.actor == "sweep" and e.action in LADDER_KINDS
    )
    twice = {k: n for k, n in steps.items() if n > 1}
    if twice:
        found.fail(f"ladder steps written more than once: {sorted(twice.items())[:5]}")
    twice_acted = {k: n for k, n in acted.items() if n > 1}
    if twice_acted:
        found.fail(f"ladder steps acted on (audited) more than once: {sorted(twice_acted.items())[:5]}")
    if set(acted) != set(row_steps):
        found.fail(
            "ladder outbox rows and audit events disagree: "
            f"rows only {sorted(set(row_steps) - set(acted))[:3]}, events only {sorted(set(acted) - set(row_steps))[:3]}"
        )
    by_cycle: dict[tuple[int, int], set[tuple[str, int]]] = defaultdict(set)
    for cid, cycle, kind, index in steps:
        by_cycle[(cid, cycle)].add((kind, index))
    # What every conversation still open when the final answers went out was owed by then.
    for cid, cycle in final.open_cycles.items():
        have = by_cycle[(cid, cycle)]
        missing = {("breach", 0), ("escalation", 0), ("escalation", 1)} - have
        if not any(kind == "nag" for kind, _ in have):
            missing.add(("nag", -1))
        if missing:
            found.fail(f"conversation {cid} cycle {cycle}: ladder steps missing {sorted(missing)}")
    # The ladder position stored on each conversation agrees with the steps written (they share
    # one transaction, so no kill may leave one without the other).
    reassigned: dict[int, set[int]] = defaultdict(set)
    for cid, _cycle, kind, index in steps:
        if kind == "reassign":
            reassigned[cid].add(index)
    for conversation in conversations.values():
        cid, current = conversation.id, by_cycle[(conversation.id, conversation.cycle)]
        disagree = []
        escalations = {index for kind, index in current if kind == "escalation"}
        if escalations != set(range(conversation.escalation_step)):
            disagree.append(
                f"escalations {sorted(escalations)} vs escalation_step {conversation.escalation_step}"
            )
        if (("breach", 0) in current) != (conversation.breach_cycle == conversation.cycle):
            disagree.append(f"breach rows vs breach_cycle {conversation.breach_cycle}")
        nags = [index for kind, index in current if kind == "nag"]
        if max(nags, default=0) != conversation.nag_level:
            disagree.append(f"nags {sorted(nags)} vs nag_level {conversation.nag_level}")
        warnings = [index for kind, index in current if kind == "warning"]
        if len(warnings) > conversation.warnings_sent:
            disagree.append(f"warnings {warnings} vs warnings_sent {conversation.warnings_sent}")
        if reassigned[cid] != set(range(conversation.reassignments)):
            disagree.append(f"reassignments {sorted(reassigned[cid])} vs {conversation.reassignments}")
        if disagree:
            found.fail(
                f"conversation {cid} cycle {conversation.cycle}: ladder state and steps disagree: {disagree}"
            )
    # Staff messages go out at least once: each step's row is sent, and its Slack message exists;
    # or it was retired because its conversation was answered first, soon after it fell due.
    retired_at: dict[tuple[int, str, int], datetime] = {}
    for event in events:
        if event.action == "ladder_retired" and event.conversation_id is not None:
            for step in event.detail.get("steps", ()):
                retired_at[(event.conversation_id, str(step["kind"]), int(step["index"]))] = event.at
    not_sent, late_retired = [], []
    last_nag: dict[int, int] = {}
    for row in rows:
        if row.kind == "nag" and row.conversation_id is not None:
            last_nag[row.conversation_id] = max(row.id, last_nag.get(row.conversation_id, 0))
    for row in rows:
        if row.status == SENT:
            continue
        if (
            row.kind == "nag"
            and row.status == RETIRED
            and "superseded by a newer nag" in (row.result or "")
            and last_nag.get(row.conversation_id or 0, 0) > row.id
        ):
            continue  # one pending nag per conversation: a newer one took its place (issue 12)
        key = (row.conversation_id or 0, row.kind, int(row.payload.get("index", 0)))
        conversation = conversations.get(row.conversation_id or 0)
        if (
            row.status != RETIRED
            or key not in retired_at
            or conversation is None
            or conversation.status != ANSWERED
        ):
            not_sent.append((row.id, row.kind, row.status))
        elif (retired_at[key] - row.created_at).total_seconds() > RETIRE_WITHIN:
            late_retired.append((row.id, row.kind, (retired_at[key] - row.created_at).total_seconds()))
    if not_sent:
        found.fail(f"ladder messages not sent: {not_sent[:5]}")
    # A breach or an escalation that waited longer than RETIRE_WITHIN and was then retired is one
    # staff never saw although it mattered while they could act; a late nag or warning retired after
    # the answer only counts (the outbox is behind on a loaded machine; the audit event names it).
    late_urgent = [row for row in late_retired if row[1] in ("breach", "escalation")]
    if late_urgent:
        found.fail(f"breach or escalation held back over {RETIRE_WITHIN} s, then retired: {late_urgent[:5]}")
    found.figures[f"ladder rows retired over {RETIRE_WITHIN:.0f} s after they fell due"] = len(late_retired)
    # What the open conversations were owed when the final answers went out reached Slack.
    owed_unsent = [
        (row.id, row.kind)
        for row in rows
        if row.status != SENT
        and row.kind in ("breach", "escalation")
        and (match := LADDER_KEY.fullmatch(row.idempotency_key)) is not None
        and final.open_cycles.get(int(match[1])) == int(match[2])
    ]
    if owed_unsent:
        found.fail(f"breach or escalation owed before the final answers not sent: {owed_unsent[:5]}")
    found.figures["ladder rows retired (answered first)"] = sum(1 for row in rows if row.status == RETIRED)
    lost = []
    for row in rows:
        where = WHERE.match(row.result or "")
        if where and slack.message(where[1], where[2]) is None:
            lost.append((row.id, row.result))
    if lost:
        found.fail(f"ladder messages marked sent but not in Slack: {lost[:5]}")
    found.figures["ladder steps"] = dict(Counter(kind for _, _, kind, _ in steps))
    found.figures["ladder steps skipped at send time (answered meanwhile)"] = sum(
        1 for row in rows if (row.result or "").startswith("skipped")
    )
    found.figures["ladder rows claimed more than once"] = sum(1 for row in rows if row.attempts > 1)
    found.figures["open cycles when the final answers went out"] = len(final.open_cycles)
    found.figures["warnings dropped (deadline passed while down)"] = sum(
        1
        for (cid, cycle), have in by_cycle.items()
        if ("breach", 0) in have and not any(k == "warning" for k, _ in have)
    )
    found.figures["Slack messages posted"] = len(slack.calls_to("chat.postMessage"))
    found.figures["cards posted twice (kill between Slack's answer and storing the card)"] = _cards_twice(
        slack
    )


def _cards_twice(slack: SlackStandIn) -> int:
    """Conversations whose card (message metadata ``replyclock_card``) was posted more than once."""
    cards: Counter[int] = Counter()
    for call in slack.calls_to("chat.postMessage"):
        metadata = call.params.get("metadata")
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        if call.ok and isinstance(metadata, dict) and metadata.get("event_type") == "replyclock_card":
            payload = metadata["event_payload"]
            # A card names its conversation; a storm digest is the card of each it lists.
            ids = (
                payload["conversation_ids"] if "conversation_ids" in payload else [payload["conversation_id"]]
            )
            for conversation_id in ids:
                cards[int(conversation_id)] += 1
    return sum(1 for n in cards.values() if n > 1)


def _customer_messages(
    found: Findings, outbox: list[Outbox], posts: list[Post], x: CrashX, story: Story
) -> None:
    """At most one acknowledgement per conversation, per author and per outbox row; none where forbidden."""
    post_by_id = {p.id: p for p in posts}
    rows = [row for row in outbox if row.kind in CUSTOMER_KINDS]
    row_by_target: dict[tuple[str, str], Outbox] = {}
    for row in rows:
        replied = post_by_id.get(int(row.payload.get("post_id", 0)))
        if replied is None:
            found.fail(f"{row.kind} row {row.id} names no stored post")
            continue
        row_by_target[(replied.external_id, str(row.payload.get("text")))] = row
    per_row: Counter[int] = Counter()
    per_conversation: Counter[int] = Counter()
    per_author: Counter[str] = Counter()
    roles = story.roles()
    stopped = {str(p.author["id"]) for p in story.planned if p.role == STOP}
    for post in x.posts:
        target = post.in_reply_to or ""
        explained = row_by_target.get((target, post.text))
        if explained is None:
            found.fail(
                f"X got a POST /2/tweets no outbox row explains: reply to {target}: {post.text[:60]!r}"
            )
            continue
        per_row[explained.id] += 1
        if explained.conversation_id is not None:
            per_conversation[explained.conversation_id] += 1
        tweet = x.published.get(target, {})
        author = str(tweet.get("author_id", "?"))
        per_author[author] += 1
        if author in stopped and _stop_came_later(posts, author, target):
            found.known_bug(
                ACK_BEFORE_OLDER_STOP,
                f"acknowledgement to tweet {target} by {author}, who wrote STOP before it; the STOP was on "
                "an older page, stored after the acknowledgement was queued",
            )
        elif roles.get(target) == IGNORED or author in stopped or author == OUR_ID:
            found.fail(
                f"acknowledgement to a forbidden target: tweet {target} by {author} ({roles.get(target)})"
            )
        if explained.status == SENT and explained.result != post.created_id:
            found.fail(
                f"{explained.kind} row {explained.id} is sent as {explained.result!r} "
                f"but X created {post.created_id!r}"
            )
    for counter, what in (
        (per_row, "outbox row"),
        (per_conversation, "conversation"),
        (per_author, "author"),
    ):
        twice = {k: n for k, n in counter.items() if n > 1}
        if twice:
            found.fail(f"customers got more than one acknowledgement per {what}: {sorted(twice.items())[:5]}")
    statuses: Counter[str] = Counter()
    for row in rows:
        skipped = (row.result or "").startswith("skipped")
        status = f"{row.status} (skipped)" if skipped else row.status
        statuses[status] += 1
        if row.status == SENT and not skipped and per_row[row.id] != 1:
            found.fail(f"{row.kind} row {row.id} is sent but X got it {per_row[row.id]} times")
        if (skipped or row.status == FAILED) and per_row[row.id]:
            found.fail(f"{row.kind} row {row.id} is {status} but X got it")
        if row.status in (PENDING, SENDING):
            found.fail(f"{row.kind} row {row.id} still {row.status} at the end")
    found.figures["acknowledgements queued"] = len(rows)
    found.figures["acknowledgement rows by status"] = dict(statuses)
    found.figures["acknowledgements posted to X"] = len(x.posts)
    found.figures["unknown acknowledgements that X did receive"] = sum(
        1 for row in rows if row.status == UNKNOWN and per_row[row.id]
    )


def _stop_came_later(posts: list[Post], author: str, target: str) -> bool:
    """The author's STOP was posted before `target` but stored after it (a later fetch of an older page)."""
    mine = [p for p in posts if p.author_id == author]
    stops = [p for p in mine if p.text.strip().upper().endswith("STOP")]
    acked = next((p for p in mine if p.external_id == target), None)
    return acked is not None and any(
        stop.posted_at <= acked.posted_at and stop.received_at > acked.received_at for stop in stops
    )


def _unknown_shown(found: Findings, outbox: list[Outbox], events: list[Event], slack: SlackStandIn) -> None:
    """Every customer message whose fate is unknown is in Slack as CHECK BY HAND, in its thread."""
    by_key = {row.idempotency_key: row for row in outbox}
    audited = {int(e.detail.get("outbox_id", 0)) for e in events if e.action == "delivery_unknown"}
    texts = {
        (c.params.get("channel"), (c.response or {}).get("ts")): str(c.params.get("text", ""))
        for c in slack.calls_to("chat.postMessage")
        if c.ok
    }
    unknown = [row for row in outbox if row.status == UNKNOWN]
    for row in unknown:
        notice = by_key.get(f"outbox:{row.id}:unknown")
        if notice is None or notice.kind != "delivery_unknown":
            found.fail(f"{row.kind} row {row.id} is unknown but no delivery_unknown message was queued")
            continue
        if row.id not in audited:
            found.fail(f"{row.kind} row {row.id} is unknown without a delivery_unknown audit event")
        where = WHERE.match(notice.result or "")
        if notice.status != SENT or where is None:
            found.fail(
                f"the delivery_unknown notice of row {row.id} did not reach Slack: {notice.status} {notice.result!r}"
            )
            continue
        text = texts.get((where[1], where[2]), "")
        if "CHECK BY HAND" not in text or f"#{row.conversation_id}" not in text:
            found.fail(
                f"the delivery_unknown notice of row {row.id} is not the CHECK BY HAND message: {text!r}"
            )
    found.figures["customer messages of unknown fate, shown to staff"] = len(unknown)


def _settled(
    found: Findings,
    outbox: list[Outbox],
    conversations: dict[int, Conversation],
    posts: list[Post],
    story: Story,
) -> None:
    """Nothing left half-done: no row `sending` or `pending`, none failed; every conversation answered,
    and answered after the customer's last word."""
    left = Counter(row.status for row in outbox if row.status in (PENDING, SENDING, FAILED))
    if left:
        found.fail(f"outbox rows left at the end: {dict(left)}")
    open_ = [c.id for c in conversations.values() if c.status != ANSWERED]
    if open_:
        found.fail(f"conversations not answered at the end: {open_[:10]}")
    post_by_external = {p.external_id: p for p in posts}
    story_ids = set(story.roles())
    for thread in story.threads.values():
        post = post_by_external.get(thread.last_customer_tweet)
        if post is None or post.conversation_id is None:
            continue
        conversation = conversations[post.conversation_id]
        answered_at: datetime | None = conversation.answered_at
        if answered_at is None or answered_at < post.posted_at:
            message = (
                f"conversation {conversation.id}: the customer's last post {post.external_id} "
                f"({post.posted_at:%H:%M:%S.%f}) came after the answer that closed it "
                f"({answered_at and answered_at.strftime('%H:%M:%S.%f')}): no clock ran for it"
            )
            answers = [
                p
                for p in posts
                if p.conversation_id == conversation.id
                and p.direction == "out"
                and p.posted_at < post.posted_at
                and p.external_id in story_ids
            ]
            if answers and all(a.received_at > post.received_at for a in answers):
                found.known_bug(FOLLOW_UP_FIRST, message + " (the follow-up was stored before our answer)")
            else:
                found.fail(message)
    found.figures["conversations"] = len(conversations)
    found.figures["outbox rows by status"] = dict(Counter(row.status for row in outbox))


def check_interrupted(found: Findings, session: Session, staff_in_flight: set[int]) -> None:
    """Staff rows a kill left `sending` were sent again soon: p99 from due (written) to sent."""
    rows = list(session.scalars(select(Outbox).where(Outbox.id.in_(sorted(staff_in_flight)))))
    delays = sorted(
        (row.sent_at - row.created_at).total_seconds() for row in rows if row.status == SENT and row.sent_at
    )
    if not delays:
        found.figures["interrupted staff rows: due to sent"] = "none interrupted"
        return
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    # For comparison: every staff row sent (how far behind the queue itself was in this run).
    everyone = sorted(
        (row.sent_at - row.created_at).total_seconds()
        for row in session.scalars(
            select(Outbox).where(Outbox.status == SENT, Outbox.kind.not_in(("ack", "reply")))
        )
        if row.sent_at
    )
    found.figures["all staff rows: due to sent"] = {
        "n": len(everyone),
        "p50 s": round(everyone[len(everyone) // 2], 2),
        "p99 s": round(everyone[min(len(everyone) - 1, int(len(everyone) * 0.99))], 2),
    }
    found.figures["interrupted staff rows: due to sent"] = {
        "n": len(delays),
        "p50 s": round(delays[len(delays) // 2], 2),
        "p99 s": round(p99, 2),
        "max s": round(delays[-1], 2),
        "retired (answered first)": sum(1 for row in rows if row.status == RETIRED),
    }
    if p99 > INTERRUPTED_P99:
        found.fail(
            f"interrupted staff rows sent {p99:.1f} s after they were due (p99), over {INTERRUPTED_P99} s"
        )
