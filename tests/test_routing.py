"""Tests for bot.core.routing: rule classification and owner choice, from plain policy data."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core import routing
from bot.core.policy import Expert, Policy, RoutingRule, Settings, Team, WeekHours
from bot.core.routing import OwnerChoice, Route, choose_owner, classify, is_on_duty
from bot.core.sla import BusinessCalendar

ALWAYS: WeekHours = {day: ((0, 1440),) for day in range(7)}
NINE_TO_FIVE: WeekHours = {day: ((9 * 60, 17 * 60),) for day in range(5)}
NEVER: WeekHours = {}

# 2024-03-13 is a Wednesday; New York is on EDT (UTC-4) since 2024-03-10.
WEDNESDAY_NOON_UTC = datetime(2024, 3, 13, 12, 0, tzinfo=UTC)


def make_expert(
    expert_id: str,
    *,
    timezone: str = "UTC",
    hours: WeekHours = ALWAYS,
    topics: tuple[str, ...] = (),
    capacity: int = 10,
    away_until: date | None = None,
    holiday_country: str | None = None,
) -> Expert:
    return Expert(
        id=expert_id,
        name=f"{expert_id.title()} Example",
        slack_id=f"U{expert_id.upper()}",
        timezone=timezone,
        hours=hours,
        topics=topics,
        capacity=capacity,
        away_until=away_until,
        holiday_country=holiday_country,
    )


def make_team(name: str, experts: Iterable[str], *, on_call: str | None = None) -> Team:
    return Team(name=name, channel=f"#{name}", experts=tuple(experts), calendar="office", on_call=on_call)


def make_policy(
    *,
    experts: Iterable[Expert] = (),
    teams: Iterable[Team] | None = None,
    rules: Iterable[RoutingRule] = (),
    vip: Iterable[str] = (),
    ignored: Iterable[str] = (),
    default_team: str | None = None,
) -> Policy:
    expert_map = {expert.id: expert for expert in experts}
    if teams is None:
        teams = [make_team("support", expert_map)]
    return Policy(
        source="test.toml",
        settings=Settings(default_team=default_team),
        calendars={},
        experts=expert_map,
        teams={team.name: team for team in teams},
        policies=(),
        rules=tuple(rules),
        accounts={},
        vip_authors=frozenset(vip),
        ignored_authors=frozenset(ignored),
    )


def route(policy: Policy, **overrides: Any) -> Route:
    post: dict[str, Any] = {
        "account": "x-main",
        "author_id": "1",
        "author_handle": "someone",
        "text": "hello",
        "language": "en",
    }
    post.update(overrides)
    return classify(policy, **post)


# --------------------------------------------------------------------------------------------
# classify


TEAM_NAMES = ("support", "comms", "tech", "billing", "dach")

RULES = (
    RoutingRule(name="press", team="comms", priority="high", authors=("@Reporter", "999")),
    RoutingRule(
        name="outage",
        team="tech",
        priority="urgent",
        keywords=("outage", "is down", "c++", "#incident", "返金", "café", "Straße"),
        topics=("infra",),
    ),
    RoutingRule(name="invoice-number", team="billing", regex=re.compile(r"INV-\d{6}\b")),
    RoutingRule(name="mastodon-german", team="dach", accounts=("mastodon-main",), languages=("de",)),
    RoutingRule(
        name="x-refunds",
        team="billing",
        priority="high",
        accounts=("x-main",),
        keywords=("refund", "Rückerstattung"),
        topics=("billing",),
    ),
)

RULES_POLICY = make_policy(teams=[make_team(name, ()) for name in TEAM_NAMES], rules=RULES)


@pytest.mark.parametrize(
    ("post", "expected_rule"),
    [
        pytest.param({}, None, id="nothing-matches"),
        # authors: id exactly, handle ignoring case and a leading @
        pytest.param({"author_id": "999", "author_handle": None}, "press", id="author-id"),
        pytest.param({"author_handle": "reporter"}, "press", id="author-handle-bare"),
        pytest.param({"author_handle": "@REPORTER"}, "press", id="author-handle-at-upper"),
        pytest.param({"author_handle": "reporters"}, None, id="author-handle-other"),
        pytest.param({"author_id": "9999"}, None, id="author-id-prefix-is-not-a-match"),
        # keywords: whole words or phrases, case-insensitive, Unicode-aware
        pytest.param({"text": "Big OUTAGE today"}, "outage", id="keyword-upper"),
        pytest.param({"text": "Outage."}, "outage", id="keyword-before-punctuation"),
        pytest.param({"text": "(outage)"}, "outage", id="keyword-in-brackets"),
        pytest.param({"text": "no outages here"}, None, id="keyword-plural-is-another-word"),
        pytest.param({"text": "blackoutage"}, None, id="keyword-inside-word"),
        pytest.param({"text": "the site IS  DOWN"}, "outage", id="phrase-any-whitespace"),
        pytest.param({"text": "the site is\ndown"}, "outage", id="phrase-newline"),
        pytest.param({"text": "this isdown"}, None, id="phrase-needs-space"),
        pytest.param({"text": "I love C++ a lot"}, "outage", id="keyword-with-symbols"),
        pytest.param({"text": "see #INCIDENT 42"}, "outage", id="keyword-hashtag"),
        pytest.param({"text": "see #incidents"}, None, id="keyword-hashtag-longer"),
        pytest.param({"text": "返金してください"}, "outage", id="keyword-cjk-substring"),
        pytest.param({"text": "CAFÉ closed"}, "outage", id="keyword-accented-upper"),
        pytest.param({"text": "cafe\u0301 closed"}, "outage", id="keyword-decomposed-accent"),
        pytest.param({"text": "cafeteria"}, None, id="keyword-accent-needed"),
        pytest.param({"text": "GROSSE STRASSE"}, "outage", id="keyword-full-case-folding"),
        pytest.param(
            {"text": "".join(chr(ord(letter) + 0xFEE0) for letter in "OUTAGE")},
            "outage",
            id="keyword-fullwidth",
        ),
        # regex: searched in the original text, case as the pattern says
        pytest.param({"text": "about INV-123456 please"}, "invoice-number", id="regex"),
        pytest.param({"text": "about INV-12345 please"}, None, id="regex-too-short"),
        pytest.param({"text": "about inv-123456 please"}, None, id="regex-case-sensitive"),
        # accounts and languages together
        pytest.param(
            {"account": "mastodon-main", "language": "de"}, "mastodon-german", id="account-language"
        ),
        pytest.param(
            {"account": "mastodon-main", "language": "DE_at"}, "mastodon-german", id="language-region"
        ),
        pytest.param({"account": "mastodon-main", "language": "en"}, None, id="language-other"),
        pytest.param({"account": "mastodon-main", "language": None}, None, id="language-unknown"),
        pytest.param(
            {"account": "mastodon-main", "language": "dea"}, None, id="language-prefix-is-not-a-tag"
        ),
        pytest.param({"account": "x-main", "language": "de"}, None, id="language-wrong-account"),
        # accounts and keywords together
        pytest.param({"text": "I want a REFUND"}, "x-refunds", id="account-keyword"),
        pytest.param({"text": "RÜCKERSTATTUNG bitte"}, "x-refunds", id="account-keyword-umlaut-upper"),
        pytest.param({"text": "Rückerstattungen"}, None, id="account-keyword-longer-word"),
        pytest.param({"account": "mastodon-main", "text": "refund"}, None, id="keyword-wrong-account"),
        # order: the first matching rule wins
        pytest.param({"author_handle": "@reporter", "text": "outage"}, "press", id="order-press-first"),
        pytest.param({"text": "outage, refund INV-123456"}, "outage", id="order-outage-first"),
        pytest.param({"text": "refund INV-123456"}, "invoice-number", id="order-regex-before-refund"),
    ],
)
def test_classify_rule_conditions(post: dict[str, Any], expected_rule: str | None) -> None:
    result = route(RULES_POLICY, **post)
    assert result.rule == expected_rule
    if expected_rule is None:
        assert result == Route(team="support", priority="normal", topics=(), rule=None)
    else:
        rule = next(rule for rule in RULES if rule.name == expected_rule)
        assert result == Route(team=rule.team, priority=rule.priority, topics=rule.topics, rule=rule.name)


def test_classify_rule_order_decides_between_two_matching_rules() -> None:
    first = RoutingRule(name="first", team="tech", keywords=("help",))
    second = RoutingRule(name="second", team="billing", accounts=("x-main",))
    teams = [make_team(name, ()) for name in TEAM_NAMES]
    assert route(make_policy(teams=teams, rules=[first, second]), text="help").rule == "first"
    assert route(make_policy(teams=teams, rules=[second, first]), text="help").rule == "second"


def test_classify_rule_without_conditions_catches_everything() -> None:
    catch_all = RoutingRule(name="everything", team="tech", priority="low")
    policy = make_policy(teams=[make_team("support", ()), make_team("tech", ())], rules=[catch_all])
    assert route(policy, text="anything at all") == Route(
        team="tech", priority="low", topics=(), rule="everything"
    )


def test_classify_blank_keywords_match_nothing() -> None:
    blank = RoutingRule(name="blank", team="tech", keywords=("", "   "))
    policy = make_policy(teams=[make_team("support", ()), make_team("tech", ())], rules=[blank])
    assert route(policy, text="anything at all").rule is None


def test_classify_default_team_from_settings() -> None:
    teams = [make_team("support", ()), make_team("billing", ())]
    assert route(make_policy(teams=teams, default_team="billing")).team == "billing"


def test_classify_default_team_is_first_team_when_unset() -> None:
    teams = [make_team("billing", ()), make_team("support", ())]
    assert route(make_policy(teams=teams)) == Route(team="billing", priority="normal", topics=(), rule=None)


def test_classify_without_any_team_raises() -> None:
    with pytest.raises(LookupError, match=r"test\.toml"):
        route(make_policy(teams=[]))


@pytest.mark.parametrize(
    ("vip", "author_id", "handle"),
    [
        pytest.param({"@BigCustomer"}, "1", "bigcustomer", id="handle-listed-with-at"),
        pytest.param({"bigcustomer"}, "1", "@BIGCUSTOMER", id="handle-given-with-at"),
        pytest.param({"42"}, "42", None, id="id"),
    ],
)
def test_classify_vip_is_urgent(vip: set[str], author_id: str, handle: str | None) -> None:
    low = RoutingRule(name="low", team="support", priority="low", keywords=("hello",))
    policy = make_policy(rules=[low], vip=vip)
    by_rule = route(policy, author_id=author_id, author_handle=handle, text="hello")
    assert (by_rule.priority, by_rule.rule) == ("urgent", "low")
    by_default = route(policy, author_id=author_id, author_handle=handle, text="other")
    assert (by_default.priority, by_default.rule) == ("urgent", None)
    assert route(policy, author_id="7", author_handle="nobody", text="hello").priority == "low"


def test_classify_ignored_author_is_flagged_but_still_routed() -> None:
    press = RoutingRule(name="press", team="comms", priority="high", keywords=("interview",))
    policy = make_policy(
        teams=[make_team("support", ()), make_team("comms", ())], rules=[press], ignored={"spammer"}
    )
    ignored = route(policy, author_handle="@Spammer", text="interview?")
    assert ignored == Route(team="comms", priority="high", topics=(), rule="press", ignored=True)
    assert route(policy, author_handle="@Spammer", text="hi").ignored
    assert not route(policy, author_handle="@friend", text="interview?").ignored


def test_classify_vip_and_ignored_are_independent() -> None:
    policy = make_policy(vip={"both"}, ignored={"both"})
    result = route(policy, author_handle="both")
    assert (result.priority, result.ignored) == ("urgent", True)


@given(
    keyword=st.text(alphabet=string.ascii_letters + "äöüéñ", min_size=1, max_size=12),
    before=st.text(alphabet=string.digits + " .,!?#", max_size=20),
    after=st.text(alphabet=string.digits + " .,!?#", max_size=20),
    upper=st.booleans(),
)
def test_classify_keyword_between_spaces_always_matches(
    keyword: str, before: str, after: str, upper: bool
) -> None:
    rule = RoutingRule(name="kw", team="support", keywords=(keyword,))
    policy = make_policy(rules=[rule])
    written = keyword.upper() if upper else keyword.lower()
    assert route(policy, text=f"{before} {written} {after}").rule == "kw"
    assert route(policy, text=f"{before} x{written}x {after}").rule is None


# --------------------------------------------------------------------------------------------
# is_on_duty


NEW_YORK_OFFICE = make_expert("nyc", timezone="America/New_York", hours=NINE_TO_FIVE)


@pytest.mark.parametrize(
    ("at", "on_duty"),
    [
        pytest.param(datetime(2024, 3, 13, 14, 0, tzinfo=UTC), True, id="14utc-is-10am-edt"),
        pytest.param(datetime(2024, 3, 13, 22, 0, tzinfo=UTC), False, id="22utc-is-6pm-edt"),
        pytest.param(datetime(2024, 3, 13, 13, 0, tzinfo=UTC), True, id="13utc-is-9am-edt"),
        pytest.param(datetime(2024, 3, 13, 12, 59, tzinfo=UTC), False, id="1259utc-is-before-9am"),
        pytest.param(datetime(2024, 1, 10, 13, 30, tzinfo=UTC), False, id="winter-13-30utc-is-8-30am-est"),
        pytest.param(datetime(2024, 1, 10, 14, 0, tzinfo=UTC), True, id="winter-14utc-is-9am-est"),
        pytest.param(datetime(2024, 3, 16, 14, 0, tzinfo=UTC), False, id="saturday"),
    ],
)
def test_is_on_duty_in_experts_own_time_zone(at: datetime, on_duty: bool) -> None:
    assert is_on_duty(NEW_YORK_OFFICE, at) is on_duty


def test_is_on_duty_uses_local_weekday() -> None:
    friday_evening: WeekHours = {4: ((20 * 60, 24 * 60),)}
    expert = make_expert("night", timezone="America/New_York", hours=friday_evening)
    # Saturday 01:00 UTC is Friday 21:00 in New York.
    assert is_on_duty(expert, datetime(2024, 3, 16, 1, 0, tzinfo=UTC))
    assert not is_on_duty(expert, datetime(2024, 3, 15, 21, 0, tzinfo=UTC))


def test_is_on_duty_accepts_any_aware_time() -> None:
    at = datetime(2024, 3, 13, 10, 0, tzinfo=ZoneInfo("America/New_York"))
    assert is_on_duty(NEW_YORK_OFFICE, at)


def test_is_on_duty_rejects_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_on_duty(NEW_YORK_OFFICE, datetime(2024, 3, 13, 14, 0))


def test_away_until_is_inclusive_in_experts_time_zone() -> None:
    expert = make_expert("tokyo", timezone="Asia/Tokyo", away_until=date(2024, 3, 13))
    # 14:00 UTC on the 13th is 23:00 on the 13th in Tokyo: still away.
    assert not is_on_duty(expert, datetime(2024, 3, 13, 14, 0, tzinfo=UTC))
    # 16:00 UTC on the 13th is 01:00 on the 14th in Tokyo: back, though it is still the 13th in UTC.
    assert is_on_duty(expert, datetime(2024, 3, 13, 16, 0, tzinfo=UTC))
    assert not is_on_duty(expert, datetime(2024, 3, 1, 3, 0, tzinfo=UTC))


def test_away_until_in_the_past_does_not_matter() -> None:
    expert = make_expert("back", away_until=date(2024, 3, 12))
    assert is_on_duty(expert, WEDNESDAY_NOON_UTC)


def test_is_on_duty_respects_public_holidays() -> None:
    expert = make_expert("usa", timezone="America/New_York", hours=NINE_TO_FIVE, holiday_country="US")
    assert not is_on_duty(expert, datetime(2024, 7, 4, 15, 0, tzinfo=UTC))  # Independence Day
    assert is_on_duty(expert, datetime(2024, 7, 5, 15, 0, tzinfo=UTC))


def test_business_calendar_is_built_once_per_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def counting(spec: Any) -> Any:
        built.append(spec.name)
        return BusinessCalendar(spec)

    monkeypatch.setattr(routing, "BusinessCalendar", counting)
    first = make_expert("cached", timezone="Europe/Berlin")
    second = make_expert("cached", timezone="Europe/Berlin")
    for _ in range(200):
        is_on_duty(first, WEDNESDAY_NOON_UTC)
    is_on_duty(second, WEDNESDAY_NOON_UTC)
    assert built == ["expert:cached", "expert:cached"]


# --------------------------------------------------------------------------------------------
# choose_owner


def owner(policy: Policy, **overrides: Any) -> OwnerChoice:
    arguments: dict[str, Any] = {
        "team": "support",
        "topics": (),
        "at": WEDNESDAY_NOON_UTC,
        "load": {},
        "last_assigned": None,
    }
    arguments.update(overrides)
    return choose_owner(policy, **arguments)


def on_duty(expert_id: str) -> OwnerChoice:
    return OwnerChoice(expert_id=expert_id, reason="on_duty")


def test_choose_owner_prefers_topic_specialist_over_load() -> None:
    policy = make_policy(
        experts=[make_expert("ana"), make_expert("bo", topics=("billing", "refunds")), make_expert("cy")]
    )
    assert owner(policy, topics=["billing"], load={"bo": 3}) == on_duty("bo")
    assert owner(policy, topics=["Refunds", "legal"], load={"bo": 3}) == on_duty("bo")


def test_choose_owner_without_specialist_uses_everyone() -> None:
    policy = make_policy(experts=[make_expert("ana", topics=("tech",)), make_expert("bo"), make_expert("cy")])
    assert owner(policy, topics=["legal"], load={"ana": 2, "bo": 1, "cy": 3}) == on_duty("bo")


def test_choose_owner_specialist_must_be_on_duty_and_have_room() -> None:
    policy = make_policy(
        experts=[
            make_expert("ana"),
            make_expert("bo", topics=("billing",), hours=NEVER),
            make_expert("cy", topics=("billing",), capacity=1),
        ]
    )
    assert owner(policy, topics=["billing"], load={"cy": 1}) == on_duty("ana")
    assert owner(policy, topics=["billing"], load={"ana": 5}) == on_duty("cy")


def test_choose_owner_least_loaded() -> None:
    policy = make_policy(experts=[make_expert("ana"), make_expert("bo"), make_expert("cy")])
    assert owner(policy, load={"ana": 2, "bo": 1, "cy": 3}) == on_duty("bo")
    assert owner(policy, load={"ana": 2, "bo": 1, "cy": 0}) == on_duty("cy")


@pytest.mark.parametrize(
    ("load", "last_assigned", "expected"),
    [
        pytest.param({}, None, "ana", id="first-without-history"),
        pytest.param({}, "ana", "bo", id="after-ana"),
        pytest.param({}, "bo", "cy", id="after-bo"),
        pytest.param({}, "cy", "ana", id="wraps"),
        pytest.param({}, "stranger", "ana", id="unknown-last"),
        pytest.param({"bo": 1}, "ana", "cy", id="skips-busier"),
        pytest.param({"ana": 1}, "cy", "bo", id="wraps-past-busier"),
        pytest.param({"ana": 1, "cy": 1}, "bo", "bo", id="only-one-least-loaded"),
    ],
)
def test_choose_owner_round_robin_on_ties(
    load: dict[str, int], last_assigned: str | None, expected: str
) -> None:
    policy = make_policy(experts=[make_expert("ana"), make_expert("bo"), make_expert("cy")])
    assert owner(policy, load=load, last_assigned=last_assigned) == on_duty(expected)


def test_choose_owner_round_robin_after_an_off_duty_last_assignee() -> None:
    policy = make_policy(experts=[make_expert("ana"), make_expert("bo", hours=NEVER), make_expert("cy")])
    assert owner(policy, last_assigned="bo") == on_duty("cy")


def test_choose_owner_rotates_when_conversations_close_quickly() -> None:
    ids = ("ana", "bo", "cy")
    policy = make_policy(experts=[make_expert(expert_id) for expert_id in ids])
    last: str | None = None
    sequence: list[str] = []
    for _ in range(30):
        choice = owner(policy, load={}, last_assigned=last)
        assert choice.expert_id is not None
        sequence.append(choice.expert_id)
        last = choice.expert_id
    assert sequence == list(ids) * 10


def test_choose_owner_spreads_evenly_as_load_grows() -> None:
    ids = ("ana", "bo", "cy", "dee")
    policy = make_policy(experts=[make_expert(expert_id, capacity=100) for expert_id in ids])
    load: dict[str, int] = {}
    last: str | None = None
    for _ in range(40):
        choice = owner(policy, load=load, last_assigned=last)
        assert choice.reason == "on_duty" and choice.expert_id is not None
        load[choice.expert_id] = load.get(choice.expert_id, 0) + 1
        last = choice.expert_id
        assert max(load.get(i, 0) for i in ids) - min(load.get(i, 0) for i in ids) <= 1
    assert load == dict.fromkeys(ids, 10)


def test_choose_owner_catches_up_uneven_load_then_rotates() -> None:
    ids = ("ana", "bo", "cy")
    policy = make_policy(experts=[make_expert(expert_id, capacity=100) for expert_id in ids])
    load = {"ana": 4, "bo": 0, "cy": 2}
    last: str | None = None
    assigned: list[str] = []
    for _ in range(9):
        choice = owner(policy, load=load, last_assigned=last)
        assert choice.expert_id is not None
        assigned.append(choice.expert_id)
        load[choice.expert_id] += 1
        last = choice.expert_id
    assert Counter(assigned) == {"bo": 5, "cy": 3, "ana": 1}
    assert load == {"ana": 5, "bo": 5, "cy": 5}


def test_choose_owner_respects_capacity() -> None:
    policy = make_policy(
        experts=[
            make_expert("ana", capacity=2),
            make_expert("bo", capacity=3),
            make_expert("zero", capacity=0),
        ],
        teams=[make_team("support", ["ana", "bo", "zero"], on_call="ana")],
    )
    assert owner(policy, load={"ana": 2, "bo": 2}) == on_duty("bo")
    assert owner(policy, load={"ana": 2, "bo": 3}) == OwnerChoice("ana", "on_call")
    assert owner(policy, load={"ana": 1, "bo": 1}) == on_duty("ana")


def test_choose_owner_falls_back_to_on_call_even_off_duty() -> None:
    experts = [
        make_expert("ana", timezone="America/New_York", hours=NINE_TO_FIVE),
        make_expert("bo", timezone="America/New_York", hours=NINE_TO_FIVE),
        make_expert("pager", hours=NEVER),
    ]
    night = datetime(2024, 3, 13, 3, 0, tzinfo=UTC)
    with_on_call = make_policy(experts=experts, teams=[make_team("support", ["ana", "bo"], on_call="pager")])
    assert owner(with_on_call, at=night) == OwnerChoice("pager", "on_call")
    assert owner(with_on_call, at=datetime(2024, 3, 13, 15, 0, tzinfo=UTC)) == on_duty("ana")
    without = make_policy(experts=experts, teams=[make_team("support", ["ana", "bo"])])
    assert owner(without, at=night) == OwnerChoice(None, "nobody")


def test_choose_owner_on_call_member_on_duty_is_chosen_normally() -> None:
    policy = make_policy(
        experts=[make_expert("ana"), make_expert("bo")],
        teams=[make_team("support", ["ana", "bo"], on_call="bo")],
    )
    assert owner(policy, load={"ana": 3}) == on_duty("bo")


def test_choose_owner_exclude_offers_to_the_next_expert() -> None:
    # "Reassign when unclaimed": ana let it sit, so it goes to someone else.
    policy = make_policy(
        experts=[make_expert("ana"), make_expert("bo"), make_expert("cy"), make_expert("pager")],
        teams=[make_team("support", ["ana", "bo", "cy"], on_call="pager")],
    )
    first = owner(policy, last_assigned="cy")
    assert first == on_duty("ana")
    load = {"ana": 1}
    second = owner(policy, load=load, last_assigned="ana", exclude={"ana"})
    assert second == on_duty("bo")
    third = owner(policy, load={"ana": 1, "bo": 1}, last_assigned="bo", exclude={"ana", "bo"})
    assert third == on_duty("cy")
    assert owner(policy, exclude={"ana", "bo", "cy"}) == OwnerChoice("pager", "on_call")
    assert owner(policy, exclude={"ana", "bo", "cy", "pager"}) == OwnerChoice(None, "nobody")


def test_choose_owner_exclude_specialist_falls_back_to_generalist() -> None:
    policy = make_policy(experts=[make_expert("ana"), make_expert("bo", topics=("billing",))])
    assert owner(policy, topics=["billing"], exclude=["bo"]) == on_duty("ana")


def test_choose_owner_skips_away_experts() -> None:
    policy = make_policy(experts=[make_expert("ana", away_until=date(2024, 3, 20)), make_expert("bo")])
    assert owner(policy, load={"bo": 9}) == on_duty("bo")


def test_choose_owner_unknown_team_raises() -> None:
    with pytest.raises(KeyError):
        owner(make_policy(experts=[make_expert("ana")]), team="nope")


def test_choose_owner_rejects_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        owner(make_policy(experts=[make_expert("ana")]), at=datetime(2024, 3, 13, 12, 0))


# --------------------------------------------------------------------------------------------
# Property: whatever the team looks like, the choice is one the rules allow.

TIMEZONES = ("UTC", "America/New_York", "Asia/Tokyo", "Europe/Berlin", "Australia/Adelaide", "Asia/Kolkata")
TOPICS = ("billing", "tech", "sales")
IDS = ("ana", "bo", "cy", "dee", "eli", "fay")


@st.composite
def owner_scenarios(draw: st.DrawFn) -> tuple[Policy, dict[str, Any]]:
    experts = [
        make_expert(
            expert_id,
            timezone=draw(st.sampled_from(TIMEZONES)),
            hours=draw(st.sampled_from((ALWAYS, NINE_TO_FIVE, NEVER))),
            topics=tuple(draw(st.lists(st.sampled_from(TOPICS), max_size=2, unique=True))),
            capacity=draw(st.integers(0, 3)),
            away_until=draw(st.none() | st.dates(date(2024, 1, 1), date(2024, 12, 31))),
        )
        for expert_id in IDS
    ]
    members = draw(st.lists(st.sampled_from(IDS), max_size=6, unique=True))
    on_call = draw(st.none() | st.sampled_from(IDS))
    policy = make_policy(experts=experts, teams=[make_team("support", members, on_call=on_call)])
    arguments: dict[str, Any] = {
        "team": "support",
        "topics": draw(st.lists(st.sampled_from((*TOPICS, "legal")), max_size=2)),
        "at": draw(st.datetimes(datetime(2024, 1, 1), datetime(2024, 12, 31), timezones=st.just(UTC))),
        "load": draw(st.dictionaries(st.sampled_from(IDS), st.integers(0, 4))),
        "last_assigned": draw(st.none() | st.sampled_from(IDS)),
        "exclude": draw(st.frozensets(st.sampled_from(IDS))),
    }
    return policy, arguments


@settings(max_examples=300, deadline=None)
@given(owner_scenarios())
def test_choose_owner_property(scenario: tuple[Policy, dict[str, Any]]) -> None:
    policy, arguments = scenario
    team = policy.teams["support"]
    load: dict[str, int] = arguments["load"]
    exclude: frozenset[str] = arguments["exclude"]
    at: datetime = arguments["at"]
    wanted = set(arguments["topics"])

    def eligible(expert_id: str) -> bool:
        expert = policy.experts[expert_id]
        return (
            expert_id not in exclude and load.get(expert_id, 0) < expert.capacity and is_on_duty(expert, at)
        )

    def specialist(expert_id: str) -> bool:
        return bool(wanted & set(policy.experts[expert_id].topics))

    pool = [expert_id for expert_id in team.experts if eligible(expert_id)]
    choice = choose_owner(policy, **arguments)

    assert choice.expert_id not in exclude
    if choice.reason == "on_duty":
        assert choice.expert_id is not None
        assert choice.expert_id in team.experts
        assert eligible(choice.expert_id)
        peers = [e for e in pool if specialist(e) == specialist(choice.expert_id)]
        if not specialist(choice.expert_id):
            assert not any(specialist(e) for e in pool)
        assert load.get(choice.expert_id, 0) == min(load.get(e, 0) for e in peers)
    elif choice.reason == "on_call":
        assert not pool
        assert choice.expert_id == team.on_call
    else:
        assert not pool
        assert choice.expert_id is None
        assert team.on_call is None or team.on_call in exclude
