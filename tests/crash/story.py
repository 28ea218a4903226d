"""Who writes to our X account, and when: a seeded plan of mentions, our answers and follow-ups.

The plan is made up front from a `random.Random`, as offsets from the start of the run, and
published in real time by `Publisher` (a thread): each tweet's id is a snowflake of its planned
wall-clock time, so ids grow in publication order and the connector's ``since_id`` paging sees
them as X would. The tweets have the shapes of the recorded ones (tests/connectors/x_server:
`tweet`, `user`; the texts of the recorded mentions are among the customers' words).

What the plan holds, besides plain mentions in bursts (several pages at ``max_results = 5``):

- our early answers (a human answered on X before or soon after the deadline), some followed by
  the customer writing again (a reply to our answer: a new cycle with the next-response target);
- an author who writes again later in a new thread (no second acknowledgement within 24 h);
- "STOP" from an author who later asks a real question (never acknowledged);
- a post by an ignored author (stored, no conversation) and a retweet (not stored at all).

`final_answers` then answers every thread whose last word is the customer's.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.connectors.x_server import RECORDED_USER_ID, recorded_mentions, tweet, user
from tests.crash.xstandin import CrashX, snowflake

OUR_ID = RECORDED_USER_ID  # the recording is @Twitter's mentions timeline; we are that account here
OUR_USER = user(OUR_ID, "Twitter", "Twitter")
SPAMMER = user("990000000001", "spambot", "Totally Real Offers")
RECORDED_AUTHORS = (
    user("63046977", "happycamper", "Emily Waligoske"),
    user("17200003", "snowman", "Jim Moffitt"),
    user("196883832", "jellybeanjones", "zachariah jones"),
)
NAMES = (
    "Ana Lima",
    "Ben Kowalski",
    "Carla Mendes",
    "Dev Patel",
    "Eli Novak",
    "Fatima Zahra",
    "Gus Olsen",
    "Hana Sato",
    "Ivan Petrov",
    "Jo Kim",
)
OWN_TEXTS = (
    "@Twitter my invoice for November was charged twice, can you refund one of them?",
    "@Twitter I was charged for a plan I cancelled last month. Refund please",
    "@Twitter the app logs me out every time I open it",
    "@Twitter where is my order A-1123? Tracking has not moved in a week",
    "@Twitter checkout page is broken in Firefox, the pay button does nothing",
    "@Twitter can I change the email on my account?",
)
FOLLOW_UPS = ("@Twitter thanks, but it still happens", "@Twitter that did not work, any other idea?")

MENTION, ANSWER, FOLLOW_UP, RETWEET, IGNORED, STOP = (
    "mention",
    "answer",
    "follow_up",
    "retweet",
    "ignored",
    "stop",
)
CUSTOMER_ROLES = frozenset({MENTION, FOLLOW_UP, STOP})


@dataclass
class _Draft:
    at: float
    role: str
    author: dict[str, str]
    text: str
    thread: int  # index of the thread's root draft
    replied_to: int | None = None  # index of a draft
    retweet_of: int | None = None
    id: str = ""


@dataclass
class Planned:
    """One tweet of the plan, ready to publish at `at` seconds after the start."""

    at: float
    role: str
    tweet: dict[str, Any]
    author: dict[str, str]


@dataclass
class Thread:
    """A customer's thread as the customer sees it: their tweets and our answers, in order."""

    root: str
    author: dict[str, str]
    last_customer_tweet: str
    last_from_us: bool = False
    tweets: list[str] = field(default_factory=list)


class Story:
    """The seeded plan; `window` seconds of mentions starting `start_wall` (``time.time()``)."""

    def __init__(self, rng: random.Random, *, window: float, start_wall: float) -> None:
        self.start_wall = start_wall
        self.window = window
        self._sequence = 0
        self._authors = self._author_pool()
        recorded = [t["text"] for t in recorded_mentions().json()["data"]]
        texts = [t if "@twitter" in t.lower() else f"@Twitter {t}" for t in recorded] + list(OWN_TEXTS)
        rng.shuffle(texts)
        drafts: list[_Draft] = []
        fresh = iter(self._authors)
        used: list[tuple[dict[str, str], float]] = []  # (author, last tweet at)
        at = 0.5
        while at < window:
            for _ in range(rng.choice((1, 1, 2, 2, 3, 4, 6, 7))):
                author = next(fresh)
                index = len(drafts)
                drafts.append(_Draft(at, MENTION, author, texts[index % len(texts)], thread=index))
                used.append((author, at))
                if rng.random() < 0.3:
                    answered_at = at + rng.uniform(1.5, 6.0)
                    drafts.append(_Draft(answered_at, ANSWER, OUR_USER, "", thread=index, replied_to=index))
                    if rng.random() < 0.5 and answered_at + 3 < window:
                        drafts.append(
                            _Draft(
                                answered_at + rng.uniform(1.0, 3.0),
                                FOLLOW_UP,
                                author,
                                rng.choice(FOLLOW_UPS),
                                thread=index,
                                replied_to=len(drafts) - 1,
                            )
                        )
            at += rng.uniform(1.5, 4.0)
        # The special cases, at random moments of the window.
        spots = sorted(rng.uniform(1.0, max(window - 4.0, 1.5)) for _ in range(4))
        earlier = [(a, t) for a, t in used if t < spots[0] - 2.0] or used[:1]
        again, _ = rng.choice(earlier)
        drafts.append(
            _Draft(
                spots[0] + 2.0,
                MENTION,
                again,
                "@Twitter another thing: my password reset mail never came",
                thread=len(drafts),
            )
        )
        stopper = next(fresh)
        drafts.append(_Draft(spots[1], STOP, stopper, "@Twitter STOP", thread=len(drafts)))
        drafts.append(
            _Draft(
                spots[1] + 2.5,
                MENTION,
                stopper,
                "@Twitter ok one real question: is the outage over?",
                thread=len(drafts),
            )
        )
        drafts.append(
            _Draft(
                spots[2], IGNORED, SPAMMER, "@Twitter WIN FREE FOLLOWERS at spam.example", thread=len(drafts)
            )
        )
        retweeter = next(fresh)
        drafts.append(
            _Draft(
                spots[3],
                RETWEET,
                retweeter,
                f"RT @{again['username']}: {drafts[0].text}"[:280],
                thread=len(drafts),
                retweet_of=0,
            )
        )
        self.planned, self.threads = self._resolve(drafts)

    def _author_pool(self) -> list[dict[str, str]]:
        pool = list(RECORDED_AUTHORS)
        for n in range(1000):
            name = NAMES[n % len(NAMES)]
            first, last = name.split()
            handle = f"{first.lower()}_{last[0].lower()}{n}"
            pool.append(user(str(1_506_000_000_000_000_000 + n * 7919), handle, name))
        return pool

    def next_id(self, at_wall: float) -> str:
        self._sequence += 1
        return snowflake(at_wall, self._sequence)

    def _resolve(self, drafts: list[_Draft]) -> tuple[list[Planned], dict[str, Thread]]:
        order = sorted(range(len(drafts)), key=lambda i: (drafts[i].at, i))
        planned: list[Planned] = []
        threads: dict[str, Thread] = {}
        for i in order:
            draft = drafts[i]
            draft.id = self.next_id(self.start_wall + draft.at)
            root = drafts[draft.thread]
            assert root.id, "a thread's root comes first"
            parent = drafts[draft.replied_to] if draft.replied_to is not None else None
            text = draft.text
            if draft.role == ANSWER:
                assert parent is not None
                text = f"@{parent.author['username']} Sorry for the wait! We have looked into it, here is what to do."
            data = tweet(
                draft.id,
                text,
                author_id=draft.author["id"],
                conversation_id=root.id,
                replied_to=parent.id if parent is not None else None,
                in_reply_to_user_id=parent.author["id"] if parent is not None else None,
            )
            if draft.retweet_of is not None:
                data["referenced_tweets"] = [{"type": "retweeted", "id": drafts[draft.retweet_of].id}]
            planned.append(Planned(draft.at, draft.role, data, draft.author))
            if draft.role in (MENTION, STOP):
                threads[draft.id] = Thread(root=draft.id, author=draft.author, last_customer_tweet=draft.id)
            thread = threads.get(root.id)
            if thread is not None:
                thread.tweets.append(draft.id)
                if draft.role == ANSWER:
                    thread.last_from_us = True
                elif draft.role == FOLLOW_UP:
                    thread.last_from_us = False
                    thread.last_customer_tweet = draft.id
        return planned, threads

    @property
    def length(self) -> float:
        """Seconds from the start to the last planned tweet."""
        return max(p.at for p in self.planned)

    def final_answers(self) -> list[dict[str, Any]]:
        """Our answer to every thread whose last word is the customer's, timestamped now."""
        now = time.time()
        answers = []
        for thread in self.threads.values():
            if thread.last_from_us:
                continue
            answer_id = self.next_id(now)
            answers.append(
                tweet(
                    answer_id,
                    f"@{thread.author['username']} Thank you for waiting, this is fixed now.",
                    author_id=OUR_ID,
                    conversation_id=thread.root,
                    replied_to=thread.last_customer_tweet,
                    in_reply_to_user_id=thread.author["id"],
                )
            )
            thread.tweets.append(answer_id)
            thread.last_from_us = True
        return answers

    def roles(self) -> dict[str, str]:
        """Tweet id -> role, for every planned tweet."""
        return {str(p.tweet["id"]): p.role for p in self.planned}


class Publisher:
    """Publishes the plan on `x` in real time, from a thread; `done` is set after the last tweet."""

    def __init__(self, story: Story, x: CrashX) -> None:
        self.story = story
        self.x = x
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="x-publisher", daemon=True)

    def start(self, start_monotonic: float) -> None:
        self._start = start_monotonic
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        users = [OUR_USER]
        for planned in self.story.planned:
            delay = self._start + planned.at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            self.x.publish([planned.tweet], users=[*users, planned.author])
        self.done.set()
