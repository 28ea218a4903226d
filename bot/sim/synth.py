"""Synthetic history: policies, arrivals and answering experts to test the simulator against.

* `mmc_policy` / `poisson_arrivals` / `ExponentialTimes`: the textbook M/M/c queue (c experts
  always on duty, Poisson arrivals, exponential answering times, one wall-clock target).
* `realistic_year`: a year of a two-team helpdesk with weekly and daily seasonality, a launch
  spike, public holidays, and experts with their own hours and speeds (answering times are
  log-normal, slower late in the day), run through the simulator to make "what happened".
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
from sqlalchemy.orm import Session

from bot.core.policy import Policy
from bot.sim.engine import Arrival, SimConversation


def _parse(text: str, source: str) -> Policy:
    from bot.config import parse_policy  # the one validator of policy files

    return parse_policy(tomllib.loads(text), source=source, text=text)


def mmc_policy(servers: int, target: timedelta) -> Policy:
    """One team of `servers` experts at work around the clock and one wall-clock target."""
    experts = "\n".join(
        f'[experts.e{i}]\nname = "Expert {i}"\nslack_id = "U0000000{i:03d}"\ntimezone = "UTC"\n'
        f'hours = {{ mon-sun = ["00:00-24:00"] }}\n'
        for i in range(servers)
    )
    members = ", ".join(f'"e{i}"' for i in range(servers))
    hours = int(target.total_seconds())
    text = f"""
[settings]
default_team = "care"
[calendars.always]
timezone = "UTC"
hours = {{ mon-sun = ["00:00-24:00"] }}
{experts}
[teams.care]
channel = "#care"
calendar = "always"
experts = [{members}]
[[policies]]
name = "standard"
clock = "wall"
first_response = "{hours}s"
warn_at = []
"""
    return _parse(text, "mmc.toml")


def poisson_arrivals(rate_per_hour: float, count: int, *, start: datetime, seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(3600.0 / rate_per_hour, size=count)
    base = start.timestamp()
    times = base + np.cumsum(gaps)
    return [
        Arrival(key=i, at=datetime.fromtimestamp(float(t), UTC), account="x", author_id=f"c{i}", text="help")
        for i, t in enumerate(times.tolist())
    ]


@dataclass
class ExponentialTimes:
    """Exponential answering times with one mean for everyone."""

    mean_seconds: float

    def sample(self, expert: str, team: str, hour_of_week: int, u: float) -> float:
        return -self.mean_seconds * math.log1p(-u)


# --- a realistic year ------------------------------------------------------------------------------

_CARE_EXPERTS = (
    # id, timezone, hours, speed (median minutes), holidays
    ("alma", "Europe/London", 'mon-fri = ["08:00-16:00"]', 9.0, "GB"),
    ("bo", "Europe/London", 'mon-fri = ["12:00-20:00"]', 12.0, "GB"),
    ("cyd", "Europe/Lisbon", 'mon-thu = ["09:00-15:00"], sat = ["10:00-14:00"]', 15.0, "PT"),
    ("dina", "America/New_York", 'mon-fri = ["08:00-14:00"]', 8.0, "US"),
    ("ed", "Europe/London", 'tue-sat = ["09:00-17:00"]', 11.0, "GB"),
)
_BILLING_EXPERTS = (
    ("fay", "Europe/Berlin", 'mon-fri = ["09:00-17:00"]', 8.0, "DE"),
    ("gus", "Europe/Berlin", 'mon-thu = ["08:00-14:00"]', 12.0, "DE"),
)


def realistic_policy(copies: int = 1) -> Policy:
    """Two teams; `copies` > 1 repeats every expert (a bigger helpdesk for bigger volumes)."""
    return _parse(realistic_policy_text(copies), "realistic.toml")


def realistic_policy_text(copies: int = 1) -> str:
    """The policy file of `realistic_policy`."""
    blocks = []
    care: list[str] = []
    billing: list[str] = []
    n = 0
    for copy in range(copies):
        for team, table in (("care", _CARE_EXPERTS), ("billing", _BILLING_EXPERTS)):
            for name, zone, hours, _speed, country in table:
                ident = f"{name}{copy}" if copies > 1 else name
                n += 1
                blocks.append(
                    f'[experts.{ident}]\nname = "{ident.title()}"\nslack_id = "U{n:09d}"\n'
                    f'timezone = "{zone}"\nhours = {{ {hours} }}\nholidays = {{ country = "{country}" }}\n'
                )
                (care if team == "care" else billing).append(f'"{ident}"')
    text = f"""
[settings]
default_team = "care"
[calendars.care-days]
timezone = "Europe/London"
hours = {{ mon-fri = ["08:00-20:00"], sat = ["10:00-14:00"] }}
holidays = {{ country = "GB" }}
[calendars.eu-office]
timezone = "Europe/Berlin"
hours = {{ mon-fri = ["09:00-17:00"] }}
holidays = {{ country = "DE" }}
{"".join(blocks)}
[teams.care]
channel = "#care"
calendar = "care-days"
experts = [{", ".join(care)}]
on_call = {care[0]}
[teams.billing]
channel = "#billing"
calendar = "eu-office"
experts = [{", ".join(billing)}]
on_call = {billing[0]}
[[routing]]
name = "billing"
team = "billing"
keywords = ["invoice", "refund"]
[[policies]]
name = "billing"
match = {{ teams = ["billing"] }}
clock = "business"
calendar = "eu-office"
first_response = "4h"
warn_at = [0.75]
nag_every = "1h"
escalation = [{{ after = "2h", notify = "team_channel" }}]
[[policies]]
name = "standard"
clock = "business"
calendar = "care-days"
first_response = "4h"
warn_at = [0.75]
nag_every = "1h"
escalation = [{{ after = "0s", notify = "team_channel" }}, {{ after = "4h", notify = "on_call" }}]
"""
    return text


@dataclass
class TrueTimes:
    """How fast the synthetic experts really are: log-normal, slower late in their day."""

    medians: dict[str, float]  # expert -> median minutes
    sigma: float = 0.7

    def sample(self, expert: str, team: str, hour_of_week: int, u: float) -> float:
        hour = hour_of_week % 24
        tired = 1.0 + 0.04 * max(hour - 12, 0)  # 4 % slower per hour after noon
        z = _normal_quantile(min(max(u, 1e-9), 1 - 1e-9))
        return 60.0 * self.medians.get(expert, 12.0) * tired * math.exp(self.sigma * z)


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile (|error| < 1.2e-9)."""
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    )
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549671348451443e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )


def true_times(copies: int = 1) -> TrueTimes:
    medians: dict[str, float] = {}
    for copy in range(copies):
        for name, _zone, _hours, speed, _country in (*_CARE_EXPERTS, *_BILLING_EXPERTS):
            medians[f"{name}{copy}" if copies > 1 else name] = speed * (1.0 + 0.1 * copy)
    return TrueTimes(medians)


# Relative volume by weekday (Mon..Sun) and by UTC hour of day.
_WEEKDAY = (1.25, 1.15, 1.1, 1.05, 1.0, 0.55, 0.45)
_HOUR = tuple(0.15 + math.exp(-(((h - 13.5) / 4.0) ** 2)) for h in range(24))


def realistic_arrivals(
    *, year: int, per_year: int, seed: int, launch_week: int = 40, launch_factor: float = 1.8
) -> list[Arrival]:
    """Non-homogeneous Poisson arrivals over `year` (thinning), about `per_year` of them.

    Weekly and daily seasonality, GB public holidays at a third of the volume, and a two-week
    launch spike from ISO week `launch_week` at `launch_factor` times the usual volume that
    decays over its second week. About one post in four mentions an invoice or a refund.
    """
    import holidays

    rng = np.random.default_rng(seed)
    start = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    off = holidays.country_holidays("GB", years=[year])
    launch = datetime.fromisocalendar(year, launch_week, 1).replace(tzinfo=UTC).timestamp()

    def intensity(t: float) -> float:
        moment = datetime.fromtimestamp(t, UTC)
        value = _WEEKDAY[moment.weekday()] * _HOUR[moment.hour]
        if moment.date() in off:
            value *= 0.33
        since = t - launch
        if 0 <= since < 14 * 86400:
            value *= 1 + (launch_factor - 1) * (
                1.0 if since < 7 * 86400 else 1 - (since - 7 * 86400) / (7 * 86400)
            )
        return value

    peak = max(_WEEKDAY) * max(_HOUR) * launch_factor
    mean = sum(_WEEKDAY) / 7 * sum(_HOUR) / 24
    hours = (end - start).total_seconds() / 3600
    base_rate = per_year / (hours * mean)  # per hour, at intensity 1
    candidate_rate = base_rate * peak
    count = int(rng.poisson(candidate_rate * hours))
    times = np.sort(rng.uniform(start.timestamp(), end.timestamp(), size=count))
    keep = rng.random(count)
    topics = rng.random(count)
    arrivals: list[Arrival] = []
    for t, u, v in zip(times.tolist(), keep.tolist(), topics.tolist(), strict=True):
        if u * peak > intensity(t):
            continue
        index = len(arrivals)
        text = "my invoice is wrong" if v < 0.25 else "the app will not open"
        arrivals.append(
            Arrival(
                key=index, at=datetime.fromtimestamp(t, UTC), account="x", author_id=f"c{index}", text=text
            )
        )
    return arrivals


def holiday_dates(year: int) -> set[date]:
    import holidays

    return set(holidays.country_holidays("GB", years=[year]))


def recent_arrivals(
    *,
    start: datetime,
    end: datetime,
    per_week: float,
    seed: int,
    texts: Sequence[tuple[float, str]],
    account: str,
) -> list[Arrival]:
    """Poisson arrivals in [start, end) with the weekly and daily seasonality of
    `realistic_arrivals` (no holidays, no launch), about `per_week` a week; each post's text is
    drawn from `texts` (weight, text)."""
    rng = np.random.default_rng(seed)
    peak = max(_WEEKDAY) * max(_HOUR)
    mean = sum(_WEEKDAY) / 7 * sum(_HOUR) / 24
    hours = (end - start).total_seconds() / 3600
    candidate_rate = per_week / (7 * 24 * mean) * peak  # per hour
    count = int(rng.poisson(candidate_rate * hours))
    times = np.sort(rng.uniform(start.timestamp(), end.timestamp(), size=count))
    keep = rng.random(count)
    weights = np.array([weight for weight, _ in texts], dtype=float)
    picks = rng.choice(len(texts), size=count, p=weights / weights.sum())
    arrivals: list[Arrival] = []
    for t, u, pick in zip(times.tolist(), keep.tolist(), picks.tolist(), strict=True):
        moment = datetime.fromtimestamp(t, UTC)
        if u * peak > _WEEKDAY[moment.weekday()] * _HOUR[moment.hour]:
            continue
        index = len(arrivals)
        arrivals.append(
            Arrival(key=index, at=moment, account=account, author_id=f"h{index}", text=texts[pick][1])
        )
    return arrivals


def write_history(
    session: Session,
    policy: Policy,
    arrivals: Sequence[Arrival],
    conversations: Sequence[SimConversation],
    *,
    account: str = "x",
) -> int:
    """Store a simulated history as if replyclock had recorded it: one account (`account`), a post,
    a conversation (owner, assignment at arrival, first response, answered) and an "answered"
    event each. The caller commits. Returns the number of conversations written."""
    from sqlalchemy import insert, select

    from storage.models import Account, Conversation, Event, Post

    account_id = session.scalar(select(Account.id).where(Account.name == account))
    if account_id is None:
        created = Account(name=account, kind="demo")
        session.add(created)
        session.flush()
        account_id = created.id
    conversation_rows: list[dict[str, object]] = []
    post_rows: list[dict[str, object]] = []
    event_rows: list[dict[str, object]] = []
    for offset, (arrival, simulated) in enumerate(zip(arrivals, conversations, strict=True)):
        ident = offset  # replaced by the database's id below
        answered = simulated.first_response_at
        conversation_rows.append(
            {
                "account_id": account_id,
                "thread_key": f"t{arrival.key}",
                "author_id": arrival.author_id,
                "status": "answered" if answered else "open",
                "team": simulated.team,
                "priority": "normal",
                "policy": simulated.policy,
                "owner": simulated.owner,
                "assigned_at": arrival.at,
                "opened_at": arrival.at,
                "cycle": 0,
                "cycle_started_at": arrival.at,
                "clock_started_at": arrival.at,
                "due_at": simulated.first_due_at,
                "last_customer_post_at": arrival.at,
                "first_response_at": answered,
                "answered_at": answered,
                "answered_by": f"expert:{simulated.answered_by}" if simulated.answered_by else None,
                "breached_at": simulated.first_due_at if simulated.breached else None,
                "warnings_sent": simulated.warnings,
                "nag_level": simulated.nags,
                "escalation_step": simulated.escalations,
                "reassignments": 0,
                "version": 1,
            }
        )
        post_rows.append(
            {
                "account_id": account_id,
                "external_id": f"p{arrival.key}-{arrival.at.timestamp():.0f}-{ident}",
                "direction": "in",
                "author_id": arrival.author_id,
                "text": arrival.text,
                "posted_at": arrival.at,
                "received_at": arrival.at,
                "thread_key": f"t{arrival.key}",
                "conversation_id": ident,
            }
        )
        if answered is not None and simulated.answered_by:
            event_rows.append(
                {
                    "conversation_id": ident,
                    "at": answered,
                    "actor": f"expert:{simulated.answered_by}",
                    "action": "answered",
                    "detail": {},
                }
            )
        for action, count in (
            ("warning", simulated.warnings),
            ("nag", simulated.nags),
            ("escalation", simulated.escalations),
        ):
            for _ in range(count):
                event_rows.append(
                    {
                        "conversation_id": ident,
                        "at": simulated.first_due_at,
                        "actor": "sweep",
                        "action": action,
                        "detail": {},
                    }
                )
    ids: list[int] = []
    for chunk in range(0, len(conversation_rows), 5000):
        ids.extend(
            session.scalars(
                insert(Conversation).returning(Conversation.id, sort_by_parameter_order=True),
                conversation_rows[chunk : chunk + 5000],
            )
        )
    for row in (*post_rows, *event_rows):
        row["conversation_id"] = ids[int(str(row["conversation_id"]))]
    for table, rows in ((Post, post_rows), (Event, event_rows)):
        for chunk in range(0, len(rows), 5000):
            session.execute(insert(table), rows[chunk : chunk + 5000])
    return len(conversation_rows)
