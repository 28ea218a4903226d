"""What a storm is: its policy file and its schedule of webhook deliveries.

Every customer post opens a conversation under one wall-clock policy with short real-time
targets, so the whole ladder (warning, breach, escalation, nags) falls due while the storm
runs: posts arrive evenly over `StormConfig.seconds`, each deadline `first_response` after
its post, so the deadlines are spread over the same span. A share of the posts are
follow-ups by an author who wrote a few seconds before (same conversation: no second card,
no second acknowledgement), a share of the deliveries are sent twice at the same moment (a
webhook retry: stored once), and `answer_after` seconds after each first post our staff
answer it through the same webhook (an own-account post in reply), which stops its ladder so
the run comes to an end.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ACCOUNT = "storm"
SECRET_ENV = "WEBHOOK_SECRET_STORM"
OWN_ID = "storm_staff"
CHANNELS = {"care": "C0STORMCARE", "billing": "C0STORMBILL", "quiet": "C0STORMQUIET"}
# expert id -> (name, Slack user id)
EXPERTS = {
    "ada": ("Ada Byron", "U0STORMADA"),
    "bo": ("Bo Chen", "U0STORMBO0"),
    "cy": ("Cy Dorsey", "U0STORMCY0"),
    "di": ("Di Evans", "U0STORMDI0"),
    "ed": ("Ed Fox", "U0STORMED0"),
    "fay": ("Fay Gold", "U0STORMFAY"),
}
# "quiet" gets every `StormConfig.quiet_every`-th post: a team whose channel and DMs stay within
# Slack's limits while the storm fills the other two (the storm's own routing: "quiet" in the text).
TEAMS = {"care": ("ada", "bo"), "billing": ("cy", "di"), "quiet": ("ed", "fay")}
QUIET_TEXT = "A quiet question about my account settings"
LADDER_KINDS = ("warning", "breach", "escalation", "nag")
_TEXTS = (
    "Is the app down? I cannot log in since this morning",
    "My invoice shows the wrong address, please fix it",
    "Where is my parcel? It was due yesterday",
    "I was charged twice for one order, can you refund one?",
    "How do I change my password?",
)


def seconds_text(value: float) -> str:
    """A duration for the policy file: whole seconds ("90s")."""
    return f"{max(1, round(value))}s"


@dataclass(frozen=True)
class StormConfig:
    """The size and the timing of one storm.

    Attributes:
        posts: customer posts (each a first post or a follow-up).
        seconds: the span the posts arrive over (at an even rate).
        concurrency: webhook requests in flight at once (the load generator's workers).
        run_processes: `replyclock run` processes.
        first_response: seconds from a post to its deadline.
        warn_at: the warning's fraction of `first_response`.
        escalation_after: seconds after the deadline of the (team channel) escalation.
        nag_every: seconds between nags after the deadline.
        answer_after: seconds after a conversation's first post when our answer arrives.
        follow_up_every: every n-th post is a follow-up of an author who wrote shortly before.
        follow_up_delay: seconds between a first post and its follow-up.
        duplicate_every: every n-th delivery is sent twice at once.
        quiet_every: every n-th first post goes to the "quiet" team (0: none), whose channel and
            DMs stay within Slack's limits.
        outbox_interval: OUTBOX_INTERVAL of the run processes (the product default unless set).
        sweep_max_interval: SWEEP_MAX_INTERVAL of the run processes (the product default unless set).
        seed: for the texts and the follow-ups.
    """

    posts: int = 1_500
    seconds: float = 30.0
    concurrency: int = 16
    run_processes: int = 4
    first_response: float = 30.0
    warn_at: float = 0.5
    escalation_after: float = 15.0
    nag_every: float = 10.0
    answer_after: float = 60.0
    follow_up_every: int = 10
    follow_up_delay: float = 3.0
    duplicate_every: int = 25
    quiet_every: int = 0
    outbox_interval: float | None = None
    sweep_max_interval: float | None = None
    seed: int = 6

    @property
    def rate(self) -> float:
        """Posts per second the schedule asks for."""
        return self.posts / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Delivery:
    """One webhook request of the schedule."""

    at: float  # seconds after the start of the storm
    external_id: str
    body: bytes
    kind: str  # "post", "follow_up" or "answer"
    author_id: str
    duplicate: bool = False  # the second copy of a delivery sent twice


@dataclass
class Schedule:
    """Every delivery in the order they are due, and what the storm should leave behind."""

    deliveries: list[Delivery] = field(default_factory=list)
    conversations: int = 0  # conversations the customer posts should open
    customer_posts: dict[str, str] = field(default_factory=dict)  # external id -> author id
    answers: dict[str, str] = field(default_factory=dict)  # answer external id -> post it answers

    @property
    def last_at(self) -> float:
        return max((d.at for d in self.deliveries), default=0.0)


def policy_toml(config: StormConfig, reply_url: str) -> str:
    """The policy file of the storm: two teams, four experts always on duty, one short wall-clock policy."""
    experts = "\n".join(
        f'[experts.{key}]\nname = "{name}"\nslack_id = "{slack_id}"\ntimezone = "UTC"\n'
        f'hours = {{ mon-sun = ["00:00-24:00"] }}\ncapacity = 1000000\n'
        for key, (name, slack_id) in EXPERTS.items()
    )
    teams = "\n".join(
        f'[teams.{team}]\nchannel = "{CHANNELS[team]}"\nexperts = ["{members[0]}", "{members[1]}"]\n'
        f'calendar = "always"\non_call = "{members[0]}"\nmanager = "{members[1]}"\n'
        for team, members in TEAMS.items()
    )
    return f"""# The storm's policy (tests/storm/scenario.py): real-time targets of seconds.

[settings]
conversation_gap = "1h"
default_team = "care"

[calendars.always]
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}

{experts}
{teams}
[[policies]]
name = "storm"
clock = "wall"
calendar = "always"
first_response = "{seconds_text(config.first_response)}"
next_response = "{seconds_text(config.first_response)}"
warn_at = [{config.warn_at}]
nag_every = "{seconds_text(config.nag_every)}"
acknowledge = true
escalation = [ {{ after = "{seconds_text(config.escalation_after)}", notify = "team_channel" }} ]

[[routing]]
name = "quiet words"
team = "quiet"
keywords = ["quiet"]

[[routing]]
name = "billing words"
team = "billing"
keywords = ["invoice", "charged", "refund"]

[accounts.{ACCOUNT}]
kind = "webhook"
legacy_signature = true  # the storm signs the legacy way
own_ids = ["{OWN_ID}"]
reply_url = "{reply_url}"
reply_timeout = 10

[acknowledgements.default]
en = "Thanks {{author}}! {{owner_first_name}} from our {{team}} team will get back to you by {{due}}."
"""


def write_policy(config: StormConfig, reply_url: str, path: Path) -> Path:
    path.write_text(policy_toml(config, reply_url))
    return path


def sign(secret: str, body: bytes) -> str:
    """The webhook signature header value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _body(
    external_id: str,
    author_id: str,
    name: str,
    text: str,
    created_at: datetime,
    reply_to: str | None = None,
) -> bytes:
    data: dict[str, object] = {
        "id": external_id,
        "author": {"id": author_id, "name": name, "handle": author_id},
        "text": text,
        "created_at": created_at.isoformat(),
        "language": "en",
    }
    if reply_to is not None:
        data["reply_to_id"] = reply_to
    return json.dumps(data).encode()


def build_schedule(config: StormConfig, start: datetime | None = None, run_id: str = "") -> Schedule:
    """The deliveries of a storm, in the order they are due.

    `created_at` of each post is its scheduled time from `start` (the wall clock when the storm
    begins): the deadlines run from when the customer wrote. `run_id` keeps external ids apart
    between storms on the same database.
    """
    begin = start or datetime.now(UTC)
    rng = random.Random(config.seed)
    schedule = Schedule()
    deliveries: list[Delivery] = []
    step = config.seconds / config.posts if config.posts else 0.0
    authors: list[tuple[str, float, str]] = []  # (author id, time of the first post, its external id)
    for index in range(config.posts):
        at = index * step
        follow_up = (
            config.follow_up_every > 0
            and index % config.follow_up_every == config.follow_up_every - 1
            and authors
        )
        if follow_up:
            # The author of the first post about `follow_up_delay` seconds ago.
            back = max(1, round(config.follow_up_delay / step)) if step > 0 else 1
            author, first_at, _first_id = authors[max(0, len(authors) - back)]
            if first_at > at - min(1.0, config.follow_up_delay):
                follow_up = False
        external_id = f"{run_id}p{index}"
        if follow_up:
            text = f"Anyone there? {rng.choice(_TEXTS)}"
            body = _body(external_id, author, author.title(), text, begin + timedelta(seconds=at))
            delivery = Delivery(at, external_id, body, "follow_up", author)
        else:
            author = f"{run_id}cust{index}"
            text = rng.choice(_TEXTS)
            if config.quiet_every > 0 and index % config.quiet_every == config.quiet_every // 2:
                text = QUIET_TEXT
            body = _body(external_id, author, author.title(), text, begin + timedelta(seconds=at))
            delivery = Delivery(at, external_id, body, "post", author)
            authors.append((author, at, external_id))
            schedule.conversations += 1
            answer_at = at + config.answer_after
            answer_id = f"{run_id}a{index}"
            deliveries.append(
                Delivery(
                    answer_at,
                    answer_id,
                    _body(
                        answer_id,
                        OWN_ID,
                        "Support",
                        "Sorry for the wait, we are on it.",
                        begin + timedelta(seconds=answer_at),
                        reply_to=external_id,
                    ),
                    "answer",
                    OWN_ID,
                )
            )
            schedule.answers[answer_id] = external_id
        schedule.customer_posts[external_id] = author
        deliveries.append(delivery)
        if config.duplicate_every > 0 and index % config.duplicate_every == 0:
            deliveries.append(
                Delivery(at, external_id, delivery.body, delivery.kind, delivery.author_id, duplicate=True)
            )
    deliveries.sort(key=lambda d: d.at)
    schedule.deliveries = deliveries
    return schedule
