"""Neighbours failing (issue 6): `replyclock run` as a real process while what it talks to misbehaves.

1. PostgreSQL is restarted mid-run: the process survives, reconnects, loses nothing.
2. Slack answers 500, then 429 with Retry-After, then times out, for a while: staff messages are
   late, then delivered, in the order they were written per conversation.
3. X answers 429 (with ``x-rate-limit-reset``), then 503: the connector parks until the reset,
   backs off, and resumes from its cursor, page by page.

Each drives ``python -m bot.cli run`` against loopback stand-ins (tests/neighbours) with SLA
targets of seconds, so the ladder climbs in real time; each prints its figures (run with -s).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select

from bot.demo.standin import SlackUser
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import RETIRED, SENT, Account, Conversation, Event, Outbox, Post
from tests.conftest import postgres_url, reset_postgres
from tests.connectors.x_server import RECORDED_USER_ID, postman_rate_limited, problem, tweet, user
from tests.neighbours.audit import SlackAudit, cards, delays, kind_of, rows
from tests.neighbours.postgres import local_cluster, restart
from tests.neighbours.standins import FlakySlack, LoggedX, Outage, Served, snowflake
from tests.neighbours.worker import CARE, LEE, SAM, LogLine, Worker, eventually, policy_toml, run_env

pytestmark = pytest.mark.slow

US = user(RECORDED_USER_ID, "acme_support", "Acme Support")
SLACK_TIMEOUT = 1.0  # seconds: the client's timeout in the run (SLACK_TIMEOUT)


# --------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class Customers:
    """Tweets from distinct customers, created now (a tweet id carries its creation time)."""

    tweets: list[dict[str, Any]]
    users: list[dict[str, str]]

    @classmethod
    def write(cls, first: int, count: int, text: str = "my order never arrived, can you help?") -> Customers:
        now = datetime.now(UTC)
        people = [
            user(str(9_000_000 + n), f"customer{n}", f"Customer {n}") for n in range(first, first + count)
        ]
        tweets = [
            tweet(snowflake(now, n), f"@acme_support {text} ({p['username']})", author_id=p["id"])
            for n, p in enumerate(people)
        ]
        return cls(tweets, people)

    @property
    def ids(self) -> list[str]:
        return [t["id"] for t in self.tweets]


def answers(customers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our account's replies to each customer tweet: seen on X, they answer the conversations."""
    now = datetime.now(UTC)
    return [
        tweet(
            snowflake(now, 100 + n),
            "Sorry about that, a replacement is on its way.",
            author_id=RECORDED_USER_ID,
            conversation_id=t["conversation_id"],
            replied_to=t["id"],
            in_reply_to_user_id=t["author_id"],
        )
        for n, t in enumerate(customers)
    ]


def inspector(url: str) -> Engine:
    """Migrate the database, then an engine for the test to look with (on SQLite a plain one: reads
    take no write lock there)."""
    migrating = make_engine(url)
    upgrade(migrating)
    migrating.dispose()
    if url.startswith("sqlite"):
        return create_engine(url)
    return make_engine(url)


def scalar(engine: Engine, query: Any) -> Any:
    with engine.connect() as connection:
        return connection.execute(query).scalar()


def status_counts(engine: Engine) -> Counter[str]:
    with engine.connect() as connection:
        return Counter(
            dict(connection.execute(select(Outbox.status, func.count()).group_by(Outbox.status)).all())
        )


def all_sent(engine: Engine) -> bool:
    """Every outbox row settled as meant: sent, or retired unsent on purpose (a ladder step of a
    conversation answered first, a nag or card update superseded by a newer one)."""
    counts = status_counts(engine)
    return SENT in counts and set(counts) <= {SENT, RETIRED}


def all_answered_and_sent(engine: Engine) -> bool:
    """Every conversation answered and every outbox row sent."""
    open_left = scalar(engine, select(func.count()).where(Conversation.answered_at.is_(None)))
    return open_left == 0 and all_sent(engine)


def assert_structured_logs(worker: Worker) -> None:
    """Every line the process wrote is one JSON event (tracebacks only inside an `exception` field)."""
    stray = [line.text for line in worker.lines() if line.event is None]
    assert not stray, "non-JSON lines on stderr:\n" + "\n".join(stray[:20])


def event_name(line: LogLine) -> str:
    """A log line's event without the scheduler's run times (``Job "Jobs.poll" raised an exception``)."""
    return re.sub(r" \(trigger: [^)]*\)", "", str(line.get("event")))


def report(title: str, figures: dict[str, Any]) -> None:
    print(f"\n[{title}] " + json.dumps(figures, default=str, sort_keys=True))


@pytest.fixture
def x_server() -> Iterator[LoggedX]:
    with LoggedX() as server:
        yield server


@pytest.fixture
def slack() -> Iterator[FlakySlack]:
    with FlakySlack(channels={CARE: "care"}, users=[SlackUser(*SAM), SlackUser(*LEE)]) as standin:
        yield standin
    assert not standin.internal_errors


# --------------------------------------------------------------------------------------------
# 2. Slack failing for a while


def test_slack_failing_for_a_while_delays_staff_messages_then_delivers_them_in_order(
    tmp_path: Path, x_server: LoggedX, slack: FlakySlack
) -> None:
    began = time.monotonic()
    # 8 s to answer, a warning at 4 s, the team channel at +2 s, the manager at +4 s, a nag every 4 s.
    config = tmp_path / "replyclock.toml"
    config.write_text(
        policy_toml(
            x_server.base_url,
            first_response="8s",
            escalation='[ { after = "2s", notify = "team_channel" }, { after = "4s", notify = "manager" } ]',
        )
    )
    url = f"sqlite:///{tmp_path / 'slack.db'}"
    engine = inspector(url)
    first = Customers.write(0, 4)
    x_server.arm(first.tweets, users=[*first.users, US])
    worker = Worker(
        run_env(database_url=url, config=config, slack_url=slack.base_url, slack_timeout=SLACK_TIMEOUT),
        tmp_path,
    )
    try:
        eventually(
            lambda: len(cards(engine)) == 4 and all(ts for _, ts in cards(engine).values()),
            15,
            "4 cards",
            worker,
        )
        # The outages, back to back: 500s, then 429 with Retry-After: 2, then answers held past the timeout.
        start = time.time() + 0.2
        phases = [
            Outage("500", start, start + 2.0, status=500, error="internal_error"),
            Outage("429", start + 2.0, start + 4.0, status=429, retry_after=2),
            Outage("timeout", start + 4.0, start + 6.0, delay=SLACK_TIMEOUT + 0.5),
        ]
        for phase in phases:
            slack.schedule(phase)
        recovered = phases[-1].end
        # New customers write as each phase begins (polled every second, carded at once), so every
        # kind of failure meets a card as well as the ladder steps falling due meanwhile.
        later: list[Customers] = []
        for n, phase in enumerate(phases):
            time.sleep(max(0.0, phase.start + 0.1 - time.time()))
            later.append(
                Customers.write(4 + 2 * n, 2 if n == 0 else 1, f"the app crashes when I pay ({phase.name})")
            )
            x_server.arm(later[-1].tweets, users=later[-1].users)
        customers = [t for wave in (first, *later) for t in wave.tweets]

        # Everything written before Slack recovered gets delivered, and what the ladder wrote while
        # the backlog drained follows it: wait for a moment when nothing older than a second is unsent.
        def drained() -> bool:
            now = time.time()
            backlog = [
                r
                for r in rows(engine)
                if r.status not in (SENT, RETIRED) and r.created_at.timestamp() < now - 1.0
            ]
            return now > recovered + 0.5 and not backlog

        eventually(drained, 30, "the backlog to be sent", worker)
        drained_at = time.time()
        # Then we answer everyone on X: the clocks stop and each card is edited to say so.
        x_server.arm(answers(customers))
        answered_at = time.time()
        eventually(
            lambda: all_answered_and_sent(engine),
            15,
            "all conversations answered and every message sent",
            worker,
        )
        assert worker.alive
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert_structured_logs(worker)

    outbox = rows(engine)
    audit = SlackAudit(slack.exchanges, outbox, cards(engine), client_timeout=SLACK_TIMEOUT)
    staff = [r for r in outbox if r.kind != "ack"]
    assert {r.status for r in outbox} <= {SENT, RETIRED}  # retired: answered first or superseded
    # Nothing written before we answered was dropped: only rows due in the last moments were skipped.
    skipped = [r for r in staff if r.skipped]
    assert all(r.created_at.timestamp() > drained_at - 1.0 for r in skipped), skipped

    # Each delivered row has its one call; every other message that reached Slack is either a note
    # of a DM escalation or the repeat of a call whose answer was lost to the client's timeout.
    posting = [r for r in staff if r.posted_to is not None]
    assert {r.id for r in posting} == set(audit.delivering), "a delivered row without its Slack message"
    lost = audit.lost_answers()
    lost_posts = [e for e in lost if e.call.method == "chat.postMessage"]
    extra = [e for found in audit.extra_posts().values() for e in found]
    assert {id(e) for e in extra} <= {id(e) for e in lost_posts}, (
        "a message reached Slack twice without a lost answer to explain it"
    )
    # A thread message whose answer was lost is posted again (at least once); a card is first
    # looked up by its metadata (conversations.history), so it may be found instead of repeated.
    # (An overdue digest's rows are handed back and may go in another digest: not a repeat of it.)
    lost_notes = [e for e in lost_posts if kind_of(e) not in ("card", "digest")]
    assert {id(e) for e in lost_notes} <= {id(e) for e in extra}, "a lost answer without its retry"
    # Cards: one post per conversation (a repeat only after a lost answer), then edits in place.
    card_posts = Counter(
        audit.conversation_of(e, {}) for e in slack.exchanges if kind_of(e) == "card" and e.call.ok
    )
    lost_cards = Counter(audit.conversation_of(e, {}) for e in lost_posts if kind_of(e) == "card")
    assert all(1 <= card_posts[cid] <= 1 + lost_cards[cid] for cid in card_posts), (card_posts, lost_cards)
    assert len(card_posts) == len(customers) == 8
    for cid, (channel, ts) in cards(engine).items():
        assert channel is not None and ts is not None
        card = slack.message(channel, ts)
        assert card is not None and card.edits >= 1 and "answered" in card.text, (cid, card)
    # Order: per conversation, each call belongs to the oldest staff row not yet delivered.
    assert audit.lane_violations() == []
    # Retry-After was honoured: no call for a conversation sooner than 2 s after its 429.
    for cid, exchanges in audit.by_conversation.items():
        for before, after in itertools.pairwise(exchanges):
            if before.call.status == 429:
                assert after.arrived >= before.answered + 2.0 - 0.05, (cid, before, after)
    # Acknowledgements to customers: at most once each (here exactly once: X never failed).
    acks = Counter(
        json.loads(s.request.body)["reply"]["in_reply_to_tweet_id"] for s in x_server.served("POST", False)
    )
    assert acks == {t["id"]: 1 for t in customers}

    with engine.connect() as connection:
        lateness = [
            float(detail.get("lateness_seconds", 0.0))
            for (detail,) in connection.execute(select(Event.detail).where(Event.actor == "sweep"))
        ]
    failures = audit.failures()
    assert failures["500"] > 0 and failures["429"] > 0 and failures["timeout"] > 0, failures
    ladder = ("warning", "breach", "escalation", "nag")
    report(
        "slack",
        {
            "outages": {p.name: round(p.end - p.start, 1) for p in phases},
            "failed_calls": dict(failures),
            "lost_answers_posted_twice": len(lost_posts),
            "rows": dict(Counter(r.kind for r in outbox)),
            "skipped_after_answer": len(skipped),
            "delay_written_to_sent_s": {
                "all_staff": delays(staff),
                "ladder": delays(staff, ladder),
                "cards": delays(staff, ("card",)),
                "written_during_outages": delays(
                    [r for r in staff if phases[0].start <= r.created_at.timestamp() < recovered]
                ),
            },
            "max_attempts": max(r.attempts for r in outbox),
            "ladder_steps_written_late_s": {
                "max": round(max(lateness), 2),
                "over_1s": sum(x > 1 for x in lateness),
            },
            "warnings_dropped": len(customers) - sum(r.kind == "warning" for r in outbox),
            "recovered_to_drained_s": round(drained_at - recovered, 1),
            "answered_to_settled_s": round(time.time() - answered_at, 1),
            "test_s": round(time.monotonic() - began, 1),
        },
    )


# --------------------------------------------------------------------------------------------
# 3. X failing: 429 with its reset, then 503s


def mention_queries(served: list[Served]) -> list[tuple[str | None, str | None, int]]:
    return [
        (s.request.query.get("since_id"), s.request.query.get("pagination_token"), s.reply.status)
        for s in served
    ]


def test_x_rate_limit_and_outage_park_the_connector_which_resumes_from_its_cursor(
    tmp_path: Path, x_server: LoggedX
) -> None:
    began = time.monotonic()
    config = tmp_path / "replyclock.toml"
    config.write_text(policy_toml(x_server.base_url, first_response="1h", poll_interval="1s", max_results=5))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = inspector(url)
    before = Customers.write(0, 3, "where is my parcel?")
    x_server.arm(before.tweets, users=before.users)
    worker = Worker(run_env(database_url=url, config=config), tmp_path)

    def stored() -> int:
        return int(scalar(engine, select(func.count()).select_from(Post).where(Post.direction == "in")) or 0)

    def cursor() -> dict[str, str]:
        return dict(json.loads(scalar(engine, select(Account.cursor)) or "{}"))

    try:
        eventually(lambda: stored() == 3 and "next_token" not in cursor(), 15, "the first 3 mentions", worker)
        # 12 new mentions (3 pages of 5, 5, 2); the 2nd page is refused: 429 until a reset 4 s away,
        # then 503 twice; then X answers again.
        reset = int(time.time()) + 4
        limited = postman_rate_limited().with_headers(
            x_rate_limit_reset=str(reset), x_rate_limit_remaining="0", x_rate_limit_limit="180"
        )
        down = problem(503, "Service Unavailable", "Service Unavailable")
        burst = Customers.write(3, 12, "my refund has not arrived")
        x_server.arm(burst.tweets, users=burst.users, mentions=[None, limited, down, down])
        # While the account is parked, 2 more arrive: newer than the pages being read.
        eventually(lambda: any(s.reply.status == 429 for s in x_server.served()), 15, "the 429", worker)
        # Parked, with the cursor of page 1 committed: where the next poll will resume.
        parked = eventually(
            lambda: scalar(engine, select(Account.parked_until)), 5, "the account to be parked", worker
        )
        parked_cursor = cursor()
        late = Customers.write(15, 2, "still waiting for my refund")
        x_server.arm(late.tweets, users=late.users)
        everyone = before.ids + burst.ids + late.ids
        eventually(lambda: stored() == len(everyone), 30, f"all {len(everyone)} mentions stored", worker)
        eventually(
            lambda: all_sent(engine) and status_counts(engine)[SENT] >= 2 * len(everyone), 10, "acks", worker
        )
        assert worker.alive
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert_structured_logs(worker)

    served = x_server.served()
    queries = mention_queries(served)
    at_429 = next(i for i, s in enumerate(served) if s.reply.status == 429)
    since, token, _ = queries[at_429]
    assert token is not None and since == before.ids[-1]  # the 2nd page: old bound, page token
    assert parked.timestamp() == reset
    assert parked_cursor == {"since_id": since, "next_token": token, "newest_id": max(burst.ids, key=int)}
    # Parked until the reset: X is not asked before it, then asked for the same page again.
    after = served[at_429 + 1]
    assert after.at >= reset, f"X asked {reset - after.at:.2f} s before the reset"
    assert queries[at_429 + 1 : at_429 + 4] == [(since, token, 503), (since, token, 503), (since, token, 200)]
    # Each 503 parks the account with back-off (1-2 s, then 2-4 s from the 1 s poll interval).
    gaps = [served[i + 1].at - served[i].at for i in (at_429 + 1, at_429 + 2)]
    assert gaps[0] >= 1.0 - 0.05 and gaps[1] >= 2.0 - 0.05, gaps  # less the time to the request
    # Then the pages go on to the end, and the next poll starts from the newest mention of the burst.
    page3 = queries[at_429 + 4]
    assert page3[0] == since and page3[1] not in (None, token) and page3[2] == 200
    assert queries[at_429 + 5] == (max(burst.ids, key=int), None, 200)
    served_ids = [i for s in served for i in s.tweet_ids]
    assert sorted(set(served_ids), key=int) == sorted(everyone, key=int)
    with engine.connect() as connection:
        posts = Counter(connection.execute(select(Post.external_id).where(Post.direction == "in")).scalars())
        conversations = scalar(engine, select(func.count()).select_from(Conversation))
    assert posts == dict.fromkeys(everyone, 1)  # nothing lost, nothing twice
    assert conversations == len(everyone)
    acks = Counter(
        json.loads(s.request.body)["reply"]["in_reply_to_tweet_id"] for s in x_server.served("POST", False)
    )
    assert acks == dict.fromkeys(everyone, 1)
    limited_lines = worker.events("connector rate limited")
    assert [line.get("until") for line in limited_lines] == [datetime.fromtimestamp(reset, UTC).isoformat()]
    failed_lines = worker.events("connector fetch failed")
    assert len(failed_lines) == 2 and all("503" in str(line.get("exception")) for line in failed_lines)
    report(
        "x",
        {
            "mention_requests": len(served),
            "statuses": dict(Counter(q[2] for q in queries)),
            "parked_for_429_s": round(after.at - served[at_429].at, 2),
            "reset_to_next_request_s": round(after.at - reset, 2),
            "backoff_after_503_s": [round(g, 2) for g in gaps],
            "stored": len(posts),
            "pages_after_429": [q[1] is not None for q in queries[at_429:]],
            "test_s": round(time.monotonic() - began, 1),
        },
    )


# --------------------------------------------------------------------------------------------
# 1. PostgreSQL restarted mid-run

FIRST_RESPONSE, WARN_AT, NAG_EVERY = 15.0, 0.5, 4.0
ESCALATIONS = (2.0, 5.0)


@pytest.mark.postgres
def test_postgres_restarted_mid_run_the_process_reconnects_and_loses_nothing(
    tmp_path: Path, x_server: LoggedX, slack: FlakySlack
) -> None:
    url = postgres_url()
    if url is None:
        pytest.skip("needs REPLYCLOCK_TEST_DATABASE_URL (PostgreSQL)")
    cluster = local_cluster(url)
    if isinstance(cluster, str):
        pytest.skip(cluster)
    began = time.monotonic()
    reset_postgres(url)
    engine = inspector(url)
    config = tmp_path / "replyclock.toml"
    config.write_text(
        policy_toml(
            x_server.base_url,
            first_response=f"{FIRST_RESPONSE:g}s",
            warn_at=WARN_AT,
            nag_every=f"{NAG_EVERY:g}s",
            escalation="[ "
            + ", ".join(
                f'{{ after = "{after:g}s", notify = "{who}" }}'
                for after, who in zip(ESCALATIONS, ("team_channel", "manager"), strict=True)
            )
            + " ]",
        )
    )
    waves = {"before start": Customers.write(0, 3)}
    x_server.arm(waves["before start"].tweets, users=[*waves["before start"].users, US])
    worker = Worker(
        run_env(database_url=url, config=config, slack_url=slack.base_url, slack_timeout=5), tmp_path
    )
    try:
        eventually(lambda: sum(1 for _, ts in cards(engine).values() if ts) == 3, 15, "3 cards", worker)
        waves["running"] = Customers.write(3, 3, "the app crashes when I pay")
        x_server.arm(waves["running"].tweets, users=waves["running"].users)
        eventually(lambda: sum(1 for _, ts in cards(engine).values() if ts) == 6, 15, "6 cards", worker)
        # Restart while the run is sending, sweeping and ingesting. Sending: a warning of the first
        # wave (written by the sweep 7.5 s after the posts) is on its way to Slack, which holds it.
        # Ingesting: X holds a poll that brings two new mentions. Both are answered once the
        # database is down: the sender knows a send's outcome, the poller has posts, and neither
        # can write them until the database is back.
        slack.hold_next_post()
        assert slack.held.wait(15), "no Slack post came to hold"
        waves["while down"] = Customers.write(6, 2, "hello? anyone there?")
        x_server.arm(waves["while down"].tweets, users=waves["while down"].users, hold=True)
        assert x_server.held.wait(5), "no poll came to hold"

        def meanwhile() -> None:
            slack.release()
            x_server.release()

        downtime = restart(cluster, down_for=2.0, while_down=meanwhile)
        assert worker.alive, worker.tail()
        waves["after restart"] = Customers.write(8, 2, "my invoice is wrong")
        x_server.arm(waves["after restart"].tweets, users=waves["after restart"].users)
        everyone = [t for wave in waves.values() for t in wave.tweets]
        eventually(
            lambda: sum(1 for _, ts in cards(engine).values() if ts) == len(everyone),
            20,
            "every card",
            worker,
        )
        # Let the first wave climb: breach (15 s), escalations (+2 s, +5 s), nags (+4 s, +8 s).
        first_posted = min(datetime.fromisoformat(t["created_at"]).timestamp() for t in everyone)
        time.sleep(max(0.0, first_posted + FIRST_RESPONSE + 2 * NAG_EVERY + 0.5 - time.time()))
        answered_at = time.time()
        replies = answers(everyone)
        x_server.arm(replies)
        eventually(lambda: all_answered_and_sent(engine), 15, "all answered and every message sent", worker)
        assert worker.alive, worker.tail()
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert_structured_logs(worker)

    # The outage was seen, and reported as one-line errors (no traceback): each job that met it
    # logged "database unavailable" with the job's name and the driver's message, and ran again on
    # time; the send in flight was recorded once it was back.
    errors = [line for line in worker.lines() if line.get("level") in ("error", "warning")]
    assert not [line for line in errors if "raised an exception" in str(line.get("event"))]
    raised = [line for line in errors if line.get("event") == "database unavailable"]
    assert raised and all(
        "OperationalError" in str(line.get("error")) and line.get("exception") is None and line.get("job")
        for line in raised
    ), raised[:3]
    # (The batch's write that waited: the outcome of the send, or the release of its untried rows.)
    waited = [line for line in errors if str(line.get("event")).startswith("database unavailable:")]
    assert waited and {line.get("status") for line in waited} <= {SENT, None}, waited
    [held] = [e for e in slack.exchanges if e.held]
    # A warning (alone, or with others due together in an overdue digest).
    assert kind_of(held) in ("warning", "digest") and held.answered < downtime.ready, held

    # Every mention X served is stored once, and each conversation has one card in Slack.
    served = {i for s in x_server.served() for i in s.tweet_ids}
    assert served == {t["id"] for t in everyone + replies}
    with engine.connect() as connection:
        posts = Counter(connection.execute(select(Post.external_id)).scalars())  # ours too ("out")
        ladder = Counter(
            (cid, action, int(detail["index"]))
            for cid, action, detail in connection.execute(
                select(Event.conversation_id, Event.action, Event.detail).where(Event.actor == "sweep")
            )
        )
        conversations = connection.execute(
            select(Conversation.id, Conversation.due_at, Conversation.answered_at, Conversation.nag_level)
        ).all()
    assert {i: posts[i] for i in served} == dict.fromkeys(served, 1)
    # The mentions of the held poll were served, not stored (the database was down), served again.
    [held_poll] = [s for s in x_server.served() if s.held]
    assert sorted(held_poll.tweet_ids) == sorted(waves["while down"].ids)
    served_twice = Counter(i for s in x_server.served() for i in s.tweet_ids if i in held_poll.tweet_ids)
    assert set(served_twice.values()) == {2}, served_twice
    assert len(conversations) == len(everyone)
    outbox = rows(engine)
    assert {r.status for r in outbox} == {SENT}, Counter(r.status for r in outbox)
    audit = SlackAudit(slack.exchanges, outbox, cards(engine), client_timeout=5.0)
    assert audit.extra_posts() == {}, "a staff message reached Slack twice"
    assert {r.id for r in outbox if r.posted_to is not None} == set(audit.delivering)
    assert audit.lane_violations() == []
    acks = Counter(
        json.loads(s.request.body)["reply"]["in_reply_to_tweet_id"] for s in x_server.served("POST", False)
    )
    assert acks == {t["id"]: 1 for t in everyone}

    # Every ladder step due before we answered was taken, once.
    assert set(ladder.values()) == {1}, [step for step, n in ladder.items() if n != 1]
    slack_s = 1.5  # the sweep wakes at each step; allow for a step falling due just as we answered
    for cid, due_at, _answered, nag_level in conversations:
        due = due_at.timestamp()
        steps = {(action, index) for c, action, index in ladder if c == cid}
        expected = (
            {("warning", 0)} if due - FIRST_RESPONSE * (1 - WARN_AT) <= answered_at - slack_s else set()
        )
        if due <= answered_at - slack_s:
            expected.add(("breach", 0))
        expected |= {
            ("escalation", i) for i, after in enumerate(ESCALATIONS) if due + after <= answered_at - slack_s
        }
        owed = int((answered_at - slack_s - due) // NAG_EVERY)
        assert expected <= steps, (cid, sorted(expected - steps))
        nags = sorted(index for action, index in steps if action == "nag")
        assert (nags[-1] if nags else 0) >= owed and nag_level == (nags[-1] if nags else 0), (cid, nags, owed)

    report(
        "postgres",
        {
            "down_s": round(downtime.seconds, 2),
            "stop_took_s": round(downtime.stopped - downtime.stopping, 2),
            "start_to_answering_s": round(downtime.ready - downtime.starting, 2),
            "first_send_after_ready_s": round(
                min(
                    r.sent_at.timestamp()
                    for r in outbox
                    if r.sent_at and r.sent_at.timestamp() > downtime.ready
                )
                - downtime.ready,
                2,
            ),
            "log_lines_warning_or_error": dict(Counter(event_name(line) for line in errors)),
            "held_post_answered_before_db_back_s": round(downtime.ready - held.answered, 2),
            "mentions": len(served),
            "ladder_steps": dict(Counter(action for _, action, _ in ladder)),
            "rows": dict(Counter(r.kind for r in outbox)),
            "max_attempts": max(r.attempts for r in outbox),
            "delay_written_to_sent_s": delays([r for r in outbox if r.kind != "ack"]),
            "test_s": round(time.monotonic() - began, 1),
        },
    )
