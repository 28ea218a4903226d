"""Loading and validating replyclock.toml: every mistake named with file, line, key and remedy."""

from __future__ import annotations

import copy
import math
import re
import tempfile
import tomllib
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import (
    ConfigError,
    ConfigProblem,
    KeyLocator,
    load_policy,
    parse_policy,
    render_key,
    summarize,
)
from bot.core.policy import DigestSchedule, Policy

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "replyclock.toml"
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")

MINIMAL = """\
[calendars.office]
timezone = "Europe/Berlin"
hours = { mon-fri = ["09:00-17:00"] }

[experts.anna]
name = "Anna Schmidt"
slack_id = "U0ANNA01"
timezone = "Europe/Berlin"

[teams.care]
channel = "#care"
experts = ["anna"]
calendar = "office"
manager = "anna"

[[policies]]
name = "standard"
first_response = "24h"

[accounts.x]
kind = "x"
"""


# --------------------------------------------------------------------------------------------
# helpers


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of the only line containing `fragment`."""
    hits = [number for number, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(hits) == 1, f"{fragment!r} found on lines {hits}"
    return hits[0]


def write(tmp_path: Path, text: str, name: str = "replyclock.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[ConfigProblem]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    for problem in caught.value.problems:
        assert problem.file == str(path)
    return caught.value.problems


def only_problem(tmp_path: Path, text: str) -> ConfigProblem:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def replace(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def assert_problem(problem: ConfigProblem, *, line: int | None, key: str, message: str) -> None:
    assert (problem.line, problem.key, problem.message) == (line, key, message), str(problem)


# --------------------------------------------------------------------------------------------
# the example


def test_example_loads_and_summarises() -> None:
    policy = load_policy(EXAMPLE)
    assert set(policy.teams) == {"care", "billing"}
    assert policy.policies[-1].name == "standard" and policy.policies[-1].matches(
        team="care", account="x", priority="normal"
    )
    billing = policy.calendars["eu-office"]
    assert billing.timezone == "Europe/Berlin"
    assert billing.hours[0] == ((9 * 60, 17 * 60),) and billing.hours[5] == ()
    assert (billing.holiday_country, billing.holiday_subdivision) == ("DE", "BE")
    assert date(2026, 12, 24) in billing.closed_dates
    assert billing.overrides == {date(2026, 12, 23): ((540, 780),)}
    assert policy.experts["ben"].hours[3] == ((480, 840),) and policy.experts["ben"].hours[4] == ()
    assert policy.experts["dora"].hours[0] == ((540, 1020),)  # the default
    assert policy.experts["mei"].away_until == date(2026, 1, 5)
    standard = policy.policies[-1]
    assert standard.first_response == timedelta(hours=24)
    assert standard.weekend_first_response == timedelta(hours=48)
    assert standard.acknowledge and standard.warn_at == (0.75,)
    assert [step.notify for step in standard.escalation] == ["team_channel", "manager"]
    assert policy.policy_for(team="billing", account="x", priority="urgent").name == "billing-priority"
    outage = policy.rules[0]
    assert outage.regex is not None and outage.regex.search("Your APP is DOWN again")
    assert policy.accounts["blog"].settings == {"url": "https://blog.acme.example/comments/feed/"}
    assert policy.accounts["blog"].can_reply is False
    assert (policy.acknowledgement_template(team="billing", language="de") or "").startswith("Danke")

    summary = summarize(policy)
    assert "2 calendars, 6 experts, 2 teams, 4 SLA policies, 5 routing rules, 4 accounts" in summary
    assert "billing (Billing): #billing, calendar eu-office" in summary
    assert policy.teams["care"].digest == policy.teams["billing"].digest == DigestSchedule(0, time(9, 0))
    assert "manager dora; digest mon 09:00" in summary
    assert "4. standard [everything else]: wall clock" in summary
    assert "1. outage: regex" in summary and "otherwise -> team care" in summary


def test_problem_text_names_file_line_key_and_expectation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = EXAMPLE_TEXT.replace(
        'calendar = "eu-office"\nexperts = ["anna", "ben"]',
        'calendar = "eu-ofice"\nexperts = ["anna", "ben"]',
    )
    write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_policy("replyclock.toml")
    (problem,) = caught.value.problems
    line = line_of(text, 'calendar = "eu-ofice"')
    assert str(problem) == (
        f"replyclock.toml:{line}: teams.billing.calendar: unknown "
        "calendar 'eu-ofice' (known: care-days, eu-office)"
    )
    assert str(caught.value).startswith("1 problem in the policy file:\n  replyclock.toml:")


def test_four_mistakes_give_exactly_four_problems(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT
    text = replace(text, "capacity = 6 ", 'capacity = "six"')
    text = replace(
        text, 'calendar = "eu-office"\nexperts = ["anna"', 'calendar = "eu-ofice"\nexperts = ["anna"'
    )
    text = replace(text, 'timezone = "Europe/London"', 'timezone = "Europe/Londn"')
    text = replace(text, "regex = '\\b(outage", "regex = '\\b((outage")
    problems = problems_of(tmp_path, text)
    assert [str(problem).split(": ", 1)[1] for problem in problems] == [
        "calendars.care-days.timezone: unknown time zone 'Europe/Londn' (did you mean 'Europe/London'?)",
        "experts.ben.capacity: expected an integer, got the string 'six'",
        "teams.billing.calendar: unknown calendar 'eu-ofice' (known: care-days, eu-office)",
        "routing[0].regex: bad regular expression "
        "'\\b((outage|down|offline|not (working|loading)|can.?t (log|sign) "
        "?in|error 5\\d\\d…': missing ), unterminated subpattern at position 2",
    ]
    assert [problem.line for problem in problems] == [
        line_of(text, "Europe/Londn"),
        line_of(text, 'capacity = "six"'),
        line_of(text, 'calendar = "eu-ofice"'),
        line_of(text, "regex = '"),
    ]


# --------------------------------------------------------------------------------------------
# each kind of mistake


def test_minimal_file_is_valid(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, MINIMAL))
    assert policy.teams["care"].language == "en"
    assert policy.settings.conversation_gap == timedelta(hours=24)
    assert policy.accounts["x"].poll_interval == timedelta(minutes=1)


def test_toml_syntax_error_is_one_problem_with_tomllib_line(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', "first_response = 24h")
    problem = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "first_response = 24h")
    assert problem.key == ""
    assert (
        problem.message
        == "TOML syntax error: expected newline or end of document after a statement at column 20"
    )
    assert str(problem) == f"{tmp_path / 'replyclock.toml'}:{problem.line}: {problem.message}"


def test_toml_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    text = MINIMAL + 'extra = ["unclosed"\n'
    problem = only_problem(tmp_path, text)
    assert problem.line == len(text.splitlines())
    assert problem.message.endswith("at the end of the file")


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_policy(tmp_path / "missing.toml")
    assert caught.value.problems[0].message.startswith("cannot read the file")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert (caught.value.problems[0].line, caught.value.problems[0].message[:22]) == (
        2,
        "the file is not UTF-8 ",
    )


def test_wrong_type_names_the_expected_type(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', "first_response = 24")
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "first_response = 24"),
        key="policies[0].first_response",
        message='expected a duration such as "24h", "1h30m" or "90s", got the integer 24',
    )


def test_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'channel = "#care"', 'chanel = "#care"')
    assert_problem(
        only_problem(tmp_path, text),  # the typo, not also "channel is missing"
        line=line_of(text, "chanel"),
        key="teams.care.chanel",
        message="unknown key 'chanel' (did you mean 'channel'?)",
    )


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    text = MINIMAL + '\n[settings]\ncolour = "blue"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "colour"),
        key="settings.colour",
        message="unknown key 'colour' (expected one of: conversation_gap, default_team, admin_channel, "
        "ack_greeting, ack_overdue_wording, cross_team_actions, retention_outbox, retention_events, "
        "retention_text)",
    )


def test_unknown_top_level_table(tmp_path: Path) -> None:
    text = MINIMAL + '\n[team.billing]\nchannel = "#billing"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "[team.billing]"),
        key="team",
        message="unknown key 'team' (did you mean 'teams'?)",
    )


def test_missing_required_key_points_at_its_table(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'calendar = "office"\n', "")
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "[teams.care]"),
        key="teams.care.calendar",
        message="required key 'calendar' is missing (expected the name of a calendar)",
    )


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        (
            'experts = ["anna"]',
            'experts = ["anna", "bob"]',
            "teams.care.experts[1]",
            "unknown expert 'bob' (known: anna)",
        ),
        (
            'manager = "anna"',
            'manager = "anne"',
            "teams.care.manager",
            "unknown expert 'anne' (known: anna)",
        ),
        (
            'first_response = "24h"',
            'first_response = "24h"\nmatch = { teams = ["cair"] }\n\n[[policies]]\nname = "rest"\n'
            'first_response = "1d"',
            "policies[0].match.teams[0]",
            "unknown team 'cair' (known: care)",
        ),
        (
            'first_response = "24h"',
            'first_response = "24h"\nmatch = { accounts = ["twitter"] }\n\n[[policies]]\nname = "rest"\n'
            'first_response = "1d"',
            "policies[0].match.accounts[0]",
            "unknown account 'twitter' (known: x)",
        ),
    ],
)
def test_unknown_references(tmp_path: Path, old: str, new: str, key: str, message: str) -> None:
    text = replace(MINIMAL, old, new)
    problem = only_problem(tmp_path, text)
    assert (problem.key, problem.message) == (key, message)
    assert problem.line == line_of(text, new.splitlines()[-1] if "match" not in new else "match =")


def test_unknown_team_references_in_settings_routing_and_acknowledgements(tmp_path: Path) -> None:
    text = MINIMAL + (
        '\n[settings]\ndefault_team = "support"\n'
        '\n[[routing]]\nname = "r"\nteam = "billing"\nkeywords = ["x"]\n'
        '\n[acknowledgements.biling]\nen = "Hi {author}"\n'
    )
    problems = problems_of(tmp_path, text)
    assert [(p.line, p.key, p.message) for p in problems] == [
        (line_of(text, "default_team"), "settings.default_team", "unknown team 'support' (known: care)"),
        (line_of(text, 'team = "billing"'), "routing[0].team", "unknown team 'billing' (known: care)"),
        (
            line_of(text, "[acknowledgements.biling]"),
            "acknowledgements.biling",
            "unknown team 'biling' (expected one of 'default', 'care')",
        ),
    ]


def test_bad_time_zone(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'timezone = "Europe/Berlin"\nhours', 'timezone = "Mars/Olympus"\nhours')
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "Mars/Olympus"),
        key="calendars.office.timezone",
        message="unknown time zone 'Mars/Olympus' (expected an IANA name such as 'Europe/Berlin')",
    )


def test_bad_regular_expression(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[routing]]\nname = "r"\nteam = "care"\nregex = "(down|outage"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "regex"),
        key="routing[0].regex",
        message="bad regular expression '(down|outage': missing ), unterminated subpattern at position 0",
    )


@pytest.mark.parametrize(
    ("holidays", "key", "message"),
    [
        (
            '{ country = "XX" }',
            "calendars.office.holidays.country",
            "holidays for country 'XX' are not supported by the holidays package "
            "(use an ISO 3166 code such as 'DE', 'US' or 'GB')",
        ),
        (
            '{ country = "de" }',
            "calendars.office.holidays.country",
            "holidays for country 'de' are not supported by the holidays package "
            "(did you mean 'DE'? use an ISO 3166 code such as 'DE', 'US' or 'GB')",
        ),
        (
            '{ country = "DE", subdivision = "BL" }',
            "calendars.office.holidays.subdivision",
            "subdivision 'BL' of DE is not supported by the holidays "
            "package (known: Augsburg, BB, BE, BW, BY, "
            "HB, HE, HH, MV, NI, NW, RP, SH, SL, SN, ST, TH)",
        ),
        (
            '{ subdivision = "BE" }',
            "calendars.office.holidays.country",
            "required key 'country' is missing (expected a country code such as 'DE')",
        ),
    ],
)
def test_unsupported_holidays(tmp_path: Path, holidays: str, key: str, message: str) -> None:
    text = replace(MINIMAL, 'hours = { mon-fri = ["09:00-17:00"] }', f"holidays = {holidays}\nhours = {{}}")
    assert_problem(only_problem(tmp_path, text), line=line_of(text, "holidays ="), key=key, message=message)


def test_holiday_subdivision_by_name_is_accepted(tmp_path: Path) -> None:
    text = replace(
        MINIMAL,
        'timezone = "Europe/Berlin"\nhours',
        'holidays = { country = "DE", subdivision = "Berlin" }\ntimezone = "Europe/Berlin"\nhours',
    )
    assert load_policy(write(tmp_path, text)).calendars["office"].holiday_subdivision == "Berlin"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            '"24 hours"',
            "bad duration '24 hours': expected numbers with units w, d, h, m or s, such as 24h, 1h30m, "
            "2d or 90s",
        ),
        ('"0s"', "must be longer than zero, got '0s'"),
        ('""', "bad duration '': expected numbers with units w, d, h, m or s, such as 24h, 1h30m, 2d or 90s"),
        (
            '"99999999999999999w"',
            "bad duration '99999999999999999w': expected numbers with units w, d, h, m or s, "
            "such as 24h, 1h30m, 2d or 90s",
        ),
    ],
)
def test_bad_durations(tmp_path: Path, value: str, message: str) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', f"first_response = {value}")
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "first_response"),
        key="policies[0].first_response",
        message=message,
    )


@pytest.mark.parametrize(
    ("hours", "key", "message"),
    [
        ('{ mon-fri = ["9-5"] }', "mon-fri[0]", "bad period '9-5': expected HH:MM-HH:MM such as 09:00-17:00"),
        (
            '{ mon-fri = ["17:00-09:00"] }',
            "mon-fri[0]",
            "bad period '17:00-09:00': the start must be before the end "
            "(split a period past midnight, e.g. 22:00-24:00 and 00:00-02:00 on the next day)",
        ),
        (
            '{ mon-fri = ["09:00-24:30"] }',
            "mon-fri[0]",
            "bad period '09:00-24:30': times run from 00:00 to 24:00",
        ),
        (
            '{ mon-fri = ["09:00-13:00", "12:00-17:00"] }',
            "mon-fri[1]",
            "periods 09:00-13:00 and 12:00-17:00 overlap",
        ),
        (
            '{ mon-fri = "09:00-17:00" }',
            "mon-fri",
            'expected an array of periods such as ["09:00-17:00"] ([] '
            "= closed), got the string '09:00-17:00'",
        ),
        (
            '{ mo = ["09:00-17:00"] }',
            "mo",
            "unknown day 'mo' (did you mean 'mon'? expected mon, tue, wed, "
            "thu, fri, sat, sun or a range such as mon-fri)",
        ),
        (
            '{ fri-mon = ["09:00-17:00"] }',
            "fri-mon",
            "day range 'fri-mon' runs backwards (expected mon, tue, wed, "
            "thu, fri, sat, sun or a range such as mon-fri)",
        ),
        ('{ mon-fri = ["09:00-17:00"], wed = ["10:00-11:00"] }', "wed", "wed is already given by 'mon-fri'"),
    ],
)
def test_bad_working_hours(tmp_path: Path, hours: str, key: str, message: str) -> None:
    text = replace(MINIMAL, 'hours = { mon-fri = ["09:00-17:00"] }', f"hours = {hours}")
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "hours ="),
        key=f"calendars.office.hours.{key}",
        message=message,
    )


def test_hours_up_to_midnight_and_split_days(tmp_path: Path) -> None:
    text = replace(
        MINIMAL,
        'hours = { mon-fri = ["09:00-17:00"] }',
        'hours = { mon = ["13:30-17:00", "09:00-12:30"], tue-sun = ["00:00-24:00"] }\n'
        'closed = [2026-12-24, "2026-12-31"]\noverrides = { '
        '2026-12-30 = [], "2026-12-23" = ["09:00-12:00"] }',
    )
    calendar = load_policy(write(tmp_path, text)).calendars["office"]
    assert calendar.hours[0] == ((540, 750), (810, 1020))
    assert calendar.hours[6] == ((0, 1440),)
    assert calendar.closed_dates == {date(2026, 12, 24), date(2026, 12, 31)}
    assert calendar.overrides == {date(2026, 12, 30): (), date(2026, 12, 23): ((540, 720),)}


def test_bad_override_date(tmp_path: Path) -> None:
    text = replace(
        MINIMAL,
        'hours = { mon-fri = ["09:00-17:00"] }',
        'hours = { mon-fri = ["09:00-17:00"] }\noverrides = { "2026-02-30" = [] }',
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "overrides"),
        key="calendars.office.overrides.2026-02-30",
        message="bad date '2026-02-30': expected YYYY-MM-DD such as 2026-12-24",
    )


@pytest.mark.parametrize(
    ("value", "key", "message"),
    [
        (
            "[0.75, 1.5]",
            "policies[0].warn_at[1]",
            "1.5 is not a fraction between 0 and 1 (exclusive); write 75 % as 0.75",
        ),
        (
            "[75]",
            "policies[0].warn_at[0]",
            "75 is not a fraction between 0 and 1 (exclusive); write 75 % as 0.75",
        ),
        (
            '["75%"]',
            "policies[0].warn_at[0]",
            "expected a fraction between 0 and 1 such as 0.75, got the string '75%'",
        ),
    ],
)
def test_bad_warn_at(tmp_path: Path, value: str, key: str, message: str) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', f'first_response = "24h"\nwarn_at = {value}')
    assert_problem(only_problem(tmp_path, text), line=line_of(text, "warn_at"), key=key, message=message)


def test_warn_at_accepts_a_single_number_and_sorts(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nwarn_at = 0.5')
    assert load_policy(write(tmp_path, text)).policies[0].warn_at == (0.5,)
    text = replace(MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nwarn_at = [0.9, 0.5]')
    assert load_policy(write(tmp_path, text)).policies[0].warn_at == (0.5, 0.9)


def test_escalation_steps(tmp_path: Path) -> None:
    text = replace(
        MINIMAL,
        'first_response = "24h"',
        'first_response = "24h"\nescalation = [\n    { after = "4h", notify = "manager" },\n'
        '    { after = "1h", notify = "team_channel" },\n    { after = "5h", notify = "boss" },\n'
        '    { notify = "owner" },\n]',
    )
    problems = problems_of(tmp_path, text)
    assert [(p.line, p.key, p.message) for p in problems] == [
        (
            line_of(text, '"1h"'),
            "policies[0].escalation[1].after",
            "steps must be in order of 'after': 1h comes after 4h",
        ),
        (
            line_of(text, '"boss"'),
            "policies[0].escalation[2].notify",
            "unknown escalation target 'boss' (expected one of "
            "'owner', 'team_channel', 'manager', 'on_call')",
        ),
        (
            line_of(text, '{ notify = "owner" }'),
            "policies[0].escalation[3].after",
            "required key 'after' is missing (expected a duration past the deadline)",
        ),
    ]


def test_escalation_to_a_manager_the_team_lacks(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'manager = "anna"\n', "")
    text = replace(
        text,
        'first_response = "24h"',
        'first_response = "24h"\nescalation = [{ after = "0s", notify = "manager" }]',
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "escalation"),
        key="policies[0].escalation[0].notify",
        message="escalates to 'manager', but team care has no manager (set "
        'manager = "<expert id>" in [teams.<name>])',
    )


def test_unknown_priority(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[routing]]\nteam = "care"\npriority = "critical"\nkeywords = ["down"]\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "critical"),
        key="routing[0].priority",
        message="unknown priority 'critical' (expected one of 'low', 'normal', 'high', 'urgent')",
    )


def test_policies_are_required(tmp_path: Path) -> None:
    text = MINIMAL.replace('[[policies]]\nname = "standard"\nfirst_response = "24h"\n', "")
    assert_problem(
        only_problem(tmp_path, text),
        line=None,
        key="policies",
        message="no SLA policies are defined (add at least one [[policies]] table)",
    )


def test_last_policy_must_be_a_catch_all(tmp_path: Path) -> None:
    text = replace(
        MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nmatch = { priorities = ["urgent"] }'
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "match"),
        key="policies[0].match",
        message="the last policy must be a catch-all without 'match', so "
        "that every conversation gets a policy "
        "(add a final [[policies]] table without 'match')",
    )


def test_policy_after_a_catch_all_is_unreachable(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '\n[[policies]]\nname = "urgent"\nfirst_response = "1h"\nmatch = { priorities = ["urgent"] }\n'
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, 'name = "urgent"') - 1,
        key="policies[1]",
        message="policy 'urgent' can never apply: 'standard' "
        "(policies[0]) before it matches every conversation",
    )


def test_business_clock_and_weekend_target_need_a_calendar(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nclock = "business"')
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "[[policies]]"),
        key="policies[0].calendar",
        message='a business clock needs a calendar (add calendar = "<name>"; known: office)',
    )
    text = replace(
        MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nweekend_first_response = "48h"'
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "weekend_first_response"),
        key="policies[0].weekend_first_response",
        message="needs a calendar to tell working days from weekends and "
        'holidays (add calendar = "<name>" to '
        "this policy; known: office)",
    )


def test_duplicate_policy_names(tmp_path: Path) -> None:
    text = replace(
        MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nmatch = { priorities = ["low"] }'
    )
    text += '\n[[policies]]\nname = "standard"\nfirst_response = "2d"\n'
    problem = only_problem(tmp_path, text)
    assert (problem.key, problem.message) == (
        "policies[1].name",
        "duplicate policy name 'standard' (also policies[0])",
    )
    assert problem.line == line_of(text, 'first_response = "2d"') - 1


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "Hi {name}!",
            "unknown placeholder {name} (allowed: {author}, {owner_first_name}, {owner}, {team}, {due}, "
            "{due_in}, {promise}; write {{ and }} for literal braces)",
        ),
        (
            "Hi {autor}!",
            "unknown placeholder {autor} (did you mean {author}? allowed: {author}, {owner_first_name}, "
            "{owner}, {team}, {due}, {due_in}, {promise}; write {{ and }} for literal braces)",
        ),
        (
            "Hi {author",
            "bad template: expected '}' before end of string (write {{ and }} for literal braces)",
        ),
        ("Hi {author!r}", "placeholder {author} takes no format spec or conversion (write {author})"),
        (
            "Hi {}",
            "unknown placeholder {} (allowed: {author}, {owner_first_name}, {owner}, {team}, {due}, "
            "{due_in}, {promise}; write {{ and }} for literal braces)",
        ),
    ],
)
def test_bad_acknowledgement_templates(tmp_path: Path, template: str, message: str) -> None:
    text = MINIMAL + f'\n[acknowledgements.default]\nen = "{template}"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "en ="),
        key="acknowledgements.default.en",
        message=message,
    )


def test_literal_braces_in_templates_are_fine(tmp_path: Path) -> None:
    text = MINIMAL + '\n[acknowledgements.default]\nen = "Hi {author} {{:-}}"\n'
    assert load_policy(write(tmp_path, text)).acknowledgements["default"]["en"] == "Hi {author} {{:-}}"


def test_acknowledging_policy_needs_a_template(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'first_response = "24h"', 'first_response = "24h"\nacknowledge = true')
    text += '\n[acknowledgements.care]\nfr = "Merci {author}"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "acknowledge = true"),
        key="policies[0].acknowledge",
        message="acknowledgements are on, but there is no template for team 'care' in 'en' (add en = "
        '"..." under [acknowledgements.care] or [acknowledgements.default])',
    )


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        (
            'slack_id = "U0ANNA01"',
            'slack_id = "anna"',
            "experts.anna.slack_id",
            "bad value 'anna': expected a Slack member id starting with U or W, such as 'U0123ABCD' "
            "(Slack profile > ⋮ > Copy member ID)",
        ),
        (
            'slack_id = "U0ANNA01"',
            "slack_id = 12345",
            "experts.anna.slack_id",
            "expected a string, got the integer 12345",
        ),
        (
            'slack_id = "U0ANNA01"',
            'slack_id = "U0ANNA01"\nemail = "anna-at-example"',
            "experts.anna.email",
            "bad value 'anna-at-example': expected an e-mail address",
        ),
        (
            'channel = "#care"',
            'channel = "care"',
            "teams.care.channel",
            "bad value 'care': expected a Slack channel such as '#care' or a channel id such as 'C0123ABCD'",
        ),
        (
            'experts = ["anna"]',
            'experts = "anna"',
            "teams.care.experts",
            "expected an array of expert ids, got the string 'anna' (write [\"anna\"])",
        ),
        (
            'manager = "anna"',
            'manager = "anna"\nlanguage = "German"',
            "teams.care.language",
            "bad value 'German': expected a language code such as 'en' or 'de'",
        ),
        (
            'slack_id = "U0ANNA01"',
            'slack_id = "U0ANNA01"\ncapacity = 0',
            "experts.anna.capacity",
            "must be at least 1, got 0 (use away_until to pause assignments)",
        ),
        (
            'slack_id = "U0ANNA01"',
            'slack_id = "U0ANNA01"\naway_until = 2026-01-05T10:00:00',
            "experts.anna.away_until",
            "expected a date without a time such as 2026-12-24, got the date-time 2026-01-05T10:00:00",
        ),
        (
            'kind = "x"',
            'kind = "x"\npoll_intervall = "5m"',
            "accounts.x.poll_intervall",
            "unknown key 'poll_intervall' (did you mean 'poll_interval'?)",
        ),
        (
            'kind = "x"',
            'kind = "x"\ncan_reply = "yes"',
            "accounts.x.can_reply",
            "expected true or false, got the string 'yes'",
        ),
        ('kind = "x"', 'kinds = "x"', "accounts.x.kinds", "unknown key 'kinds' (did you mean 'kind'?)"),
    ],
)
def test_bad_values(tmp_path: Path, old: str, new: str, key: str, message: str) -> None:
    text = replace(MINIMAL, old, new)
    problem = only_problem(tmp_path, text)
    assert (problem.key, problem.message) == (key, message)
    assert problem.line == line_of(text, new.splitlines()[-1])


def test_duplicate_slack_ids_and_vip_also_ignored(tmp_path: Path) -> None:
    text = MINIMAL + (
        '\n[experts.bob]\nname = "Bob"\nslack_id = "U0ANNA01"\ntimezone = "UTC"\n'
        '\n[authors]\nvip = ["@big"]\nignore = ["@spam", "@big"]\n'
    )
    problems = problems_of(tmp_path, text)
    assert [(p.line, p.key, p.message) for p in problems] == [
        (
            text.splitlines().index('slack_id = "U0ANNA01"', line_of(text, "[experts.bob]")) + 1,
            "experts.bob.slack_id",
            "Slack id U0ANNA01 is also used by expert 'anna'",
        ),
        (line_of(text, "ignore"), "authors.ignore[1]", "'@big' is listed both as vip and as ignore"),
    ]


def test_routing_topics_must_be_offered_by_the_team(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[routing]]\nteam = "care"\nkeywords = ["refund"]\ntopics = ["refunds"]\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "topics"),
        key="routing[0].topics[0]",
        message="no expert of team 'care' lists topic 'refunds' (none lists any topics)",
    )


def test_routing_rule_after_an_unconditional_rule(tmp_path: Path) -> None:
    text = (
        MINIMAL + '\n[[routing]]\nname = "all"\nteam = '
        '"care"\n\n[[routing]]\nname = "late"\nteam = "care"\nkeywords = ["x"]\n'
    )
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, 'name = "late"') - 1,
        key="routing[1]",
        message="rule 'late' can never apply: 'all' (routing[0]) before it "
        "has no conditions and matches every post",
    )


def test_sections_of_the_wrong_shape(tmp_path: Path) -> None:
    text = MINIMAL.replace("[[policies]]", "[policies]")
    problem = only_problem(tmp_path, text)
    assert (problem.line, problem.key) == (line_of(text, "[policies]"), "policies")
    assert (
        problem.message == "expected an array of tables (write [[policies]] before each entry), got a table"
    )


def test_many_problems_come_in_file_order(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT
    text = replace(text, 'conversation_gap = "24h"', 'conversation_gap = "1 day"')
    text = replace(text, 'slack_id = "U01DORA0006"', 'slack_id = "dora"')
    text = replace(text, "warn_at = [0.5, 0.75]", "warn_at = [50, 75]")
    problems = problems_of(tmp_path, text)
    lines = [problem.line for problem in problems]
    assert len(problems) == 4 and lines == sorted(lines)  # type: ignore[type-var]


def test_empty_sections_and_lists(tmp_path: Path) -> None:
    text = replace(MINIMAL, 'experts = ["anna"]', 'experts = ["anna", "anna"]')
    problem = only_problem(tmp_path, text)
    assert (problem.key, problem.message) == ("teams.care.experts[1]", "expert 'anna' is listed twice")
    text = replace(MINIMAL, 'experts = ["anna"]', "experts = []")
    problem = only_problem(tmp_path, text)
    assert (problem.key, problem.message) == ("teams.care.experts", "a team needs at least one expert")
    text = MINIMAL.split("[teams.care]")[0] + "[teams]\n\n[[policies]]\nname = 'p'\nfirst_response = '1h'\n"
    problem = only_problem(tmp_path, text)
    assert (problem.line, problem.key) == (line_of(text, "[teams]"), "teams")
    assert problem.message == "no teams are defined (add a [teams.<name>] table)"


def test_bad_acknowledgement_language(tmp_path: Path) -> None:
    text = MINIMAL + '\n[acknowledgements.default]\nEnglish = "Hi {author}"\n'
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "English"),
        key="acknowledgements.default.English",
        message="bad language code 'English' (expected e.g. en or de)",
    )


# --------------------------------------------------------------------------------------------
# the weekly digest time of a team


def test_digest_time_defaults_to_monday_nine(tmp_path: Path) -> None:
    team = load_policy(write(tmp_path, MINIMAL)).teams["care"]
    assert team.digest == DigestSchedule() == DigestSchedule(weekday=0, at=time(9, 0))


@pytest.mark.parametrize(
    ("value", "expected", "shown"),
    [
        ('"mon 09:00"', DigestSchedule(0, time(9, 0)), "digest mon 09:00"),
        ('"fri 17:30"', DigestSchedule(4, time(17, 30)), "digest fri 17:30"),
        ('" Sun  00:00 "', DigestSchedule(6, time(0, 0)), "digest sun 00:00"),
        ('"SAT 23:59"', DigestSchedule(5, time(23, 59)), "digest sat 23:59"),
        ('"off"', None, "digest off"),
        ("'Off'", None, "digest off"),
    ],
)
def test_digest_time_accepted(
    tmp_path: Path, value: str, expected: DigestSchedule | None, shown: str
) -> None:
    text = replace(MINIMAL, 'manager = "anna"', f'manager = "anna"\ndigest = {value}')
    policy = load_policy(write(tmp_path, text))
    assert policy.teams["care"].digest == expected
    assert f"manager anna; {shown}" in summarize(policy)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"monday 9"', """expected "mon 09:00" or "off", got 'monday 9'"""),
        ('"monday 09:00"', """expected "mon 09:00" or "off", got 'monday 09:00'"""),
        ('"mon 9:00"', """expected "mon 09:00" or "off", got 'mon 9:00'"""),
        ('"mon 24:00"', """expected "mon 09:00" or "off", got 'mon 24:00'"""),
        ('"mon 09:60"', """expected "mon 09:00" or "off", got 'mon 09:60'"""),
        ('"mon 09:00:00"', """expected "mon 09:00" or "off", got 'mon 09:00:00'"""),
        ('"09:00"', """expected "mon 09:00" or "off", got '09:00'"""),
        ('"mon-fri 09:00"', """expected "mon 09:00" or "off", got 'mon-fri 09:00'"""),
        ('"mon 09:00 Europe/Berlin"', """expected "mon 09:00" or "off", got 'mon 09:00 Europe/Berlin'"""),
        ('"no"', """expected "mon 09:00" or "off", got 'no'"""),
        ('""', """expected "mon 09:00" or "off", got ''"""),
        ("false", 'expected "mon 09:00" or "off", got the boolean false'),
        ("9", 'expected "mon 09:00" or "off", got the integer 9'),
        ("09:00:00", 'expected "mon 09:00" or "off", got the time 09:00:00'),
        ('["mon 09:00"]', 'expected "mon 09:00" or "off", got an array'),
        ('{ day = "mon", at = "09:00" }', 'expected "mon 09:00" or "off", got a table'),
    ],
)
def test_bad_digest_time(tmp_path: Path, value: str, message: str) -> None:
    text = replace(MINIMAL, 'manager = "anna"', f'manager = "anna"\ndigest = {value}')
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "digest = "),
        key="teams.care.digest",
        message=message,
    )


def test_bad_digest_time_in_the_example_names_its_line(tmp_path: Path) -> None:
    text = replace(
        EXAMPLE_TEXT,
        'digest = "mon 09:00"                                  # weekly',
        'digest = "monday 9"  # weekly',
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    line = line_of(text, 'digest = "monday 9"')
    assert line == line_of(text, 'language = "en"') + 1  # in [teams.care]
    assert (
        str(problem) == f"""{path}:{line}: teams.care.digest: expected "mon 09:00" or "off", got 'monday 9'"""
    )


def test_digest_time_in_an_inline_team_table_and_a_misspelt_key(tmp_path: Path) -> None:
    inline = MINIMAL.replace(
        '[teams.care]\nchannel = "#care"\nexperts = ["anna"]\ncalendar = "office"\nmanager = "anna"\n',
        '[teams]\ncare = { channel = "#care", experts = ["anna"], calendar = "office", digest = "fri 5pm" }\n',
    )
    assert inline != MINIMAL
    assert_problem(
        only_problem(tmp_path, inline),
        line=line_of(inline, "digest = "),
        key="teams.care.digest",
        message="""expected "mon 09:00" or "off", got 'fri 5pm'""",
    )
    text = replace(MINIMAL, 'manager = "anna"', 'manager = "anna"\ndigets = "fri 17:00"')
    assert_problem(
        only_problem(tmp_path, text),
        line=line_of(text, "digets"),
        key="teams.care.digets",
        message="unknown key 'digets' (did you mean 'digest'?)",
    )


def test_parse_policy_validates_dicts_without_lines() -> None:
    data = tomllib.loads(MINIMAL)
    data["teams"]["care"]["calendar"] = "nowhere"
    with pytest.raises(ConfigError) as caught:
        parse_policy(data, source="<dict>", text=None)
    (problem,) = caught.value.problems
    assert str(problem) == "<dict>: teams.care.calendar: unknown calendar 'nowhere' (known: office)"
    assert isinstance(parse_policy(tomllib.loads(MINIMAL), source="<dict>", text=None), Policy)


# --------------------------------------------------------------------------------------------
# the key locator


LOCATOR_TEXT = '''\
top = 1                      # line 1
[a]                          # line 2
b.c = "x"                    # line 3
"quoted key" = 'v'           # line 4
inline = { p = 1, q = { r = [1, 2] } }   # line 5
multi = [                    # line 6
  "one",                     # line 7
  { deep = true },           # line 8
]
text = """
line 11 [not.a.table]
"""

[[rows]]                     # line 14
name = "first"               # line 15
[rows.sub]                   # line 16
k = 1                        # line 17
[[rows]]                     # line 18
name = "second"              # line 19
[[rows.items]]               # line 20
v = 1                        # line 21
[[rows.items]]               # line 22
[ x . "y.z" ]                # line 23
w = 2                        # line 24
'''


@pytest.mark.parametrize(
    ("path", "line"),
    [
        (("top",), 1),
        (("a",), 2),
        (("a", "b"), 3),
        (("a", "b", "c"), 3),
        (("a", "quoted key"), 4),
        (("a", "inline", "q", "r", 1), 5),
        (("a", "multi"), 6),
        (("a", "multi", 0), 7),
        (("a", "multi", 1, "deep"), 8),
        (("a", "text"), 10),
        (("rows",), 14),
        (("rows", 0), 14),
        (("rows", 0, "name"), 15),
        (("rows", 0, "sub", "k"), 17),
        (("rows", 1, "name"), 19),
        (("rows", 1, "items", 0, "v"), 21),
        (("rows", 1, "items", 1), 22),
        (("x", "y.z", "w"), 24),
        (("x", "y.z"), 23),
        (("a", "missing", "deeper"), 2),  # falls back to the table header
        (("rows", 1, "nothing"), 18),
        (("nothing",), None),
    ],
)
def test_locator_finds_lines(path: tuple[str | int, ...], line: int | None) -> None:
    tomllib.loads(LOCATOR_TEXT)  # the locator is meant for valid TOML
    assert KeyLocator(LOCATOR_TEXT).line_of(path) == line


def test_locator_keeps_what_it_found_before_text_it_does_not_understand() -> None:
    locator = KeyLocator("a = 1\nb = 2\nc = ?? ]]\nd = 4\n")
    assert (locator.line_of(("b",)), locator.line_of(("d",))) == (2, None)


def test_render_key() -> None:
    assert render_key(("policies", 0, "escalation", 1, "after")) == "policies[0].escalation[1].after"
    assert render_key(("calendars", "eu", "overrides", "2026-12-31")) == "calendars.eu.overrides.2026-12-31"
    assert render_key(("x", 'a "b".c')) == 'x."a \\"b\\".c"'


# --------------------------------------------------------------------------------------------
# fuzzing: whatever the file holds, the answer is a Policy or a ConfigError


def toml_string(text: str) -> str:
    out = ['"']
    named = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    for char in text:
        if char in named:
            out.append(named[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(data: dict[str, object]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in data.items())


def all_paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += all_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += all_paths(item, (*prefix, index))
    return found


BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
EXAMPLE_DATA = tomllib.loads(EXAMPLE_TEXT)
EXAMPLE_PATHS = all_paths(EXAMPLE_DATA)
KEY_NAMES = sorted({part for path in EXAMPLE_PATHS for part in path if isinstance(part, str)})

interesting_strings = st.sampled_from(
    [
        "",
        " ",
        "24h",
        "0s",
        "1h30m",
        "-1h",
        "99999999999999999999w",
        "09:00-17:00",
        "00:00-24:00",
        "17:00-09:00",
        "mon-fri",
        "Europe/Berlin",
        "Nowhere/Else",
        "../../etc/passwd",
        "DE",
        "BE",
        "XX",
        "care",
        "billing",
        "eu-office",
        "anna",
        "manager",
        "urgent",
        "wall",
        "business",
        "(",
        "[a-",
        "(?P<",
        "{author}",
        "{nope}",
        "{",
        "}",
        "#care",
        "U0123",
        "2026-12-24",
        "2026-02-30",
        "x",
        "\x00",
        "é",
    ]
)
scalars = st.one_of(
    interesting_strings,
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.dates(),
    st.datetimes(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def mutate(original: dict[str, object], draw: Callable[[st.SearchStrategy[Any]], Any]) -> dict[str, object]:
    data = copy.deepcopy(original)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = all_paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: object = data
        for part in path[:-1]:
            parent = parent[part]  # type: ignore[index]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "insert"]))
        if action == "replace":
            parent[last] = draw(values)  # type: ignore[index]
        elif action == "delete":
            del parent[last]  # type: ignore[attr-defined]
        else:
            target = parent[last]  # type: ignore[index]
            if isinstance(target, dict):
                target[draw(st.sampled_from(KEY_NAMES) | st.text(min_size=1, max_size=8))] = draw(values)
            elif isinstance(target, list):
                target.append(draw(values))
    return data


def assert_policy_or_config_error(call: object) -> None:
    assert callable(call)
    try:
        result = call()
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert isinstance(problem, ConfigProblem) and problem.message
            assert problem.line is None or problem.line >= 1
            str(problem)
    else:
        assert isinstance(result, Policy)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_toml_writer_round_trips_the_example() -> None:
    assert tomllib.loads(toml_document(EXAMPLE_DATA)) == EXAMPLE_DATA
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "replyclock.toml"
        path.write_text(toml_document(EXAMPLE_DATA), encoding="utf-8")
        assert isinstance(load_policy(path), Policy)


@FUZZ
@given(st.data())
def test_fuzz_random_values_at_random_keys(data: st.DataObject) -> None:
    mutated = mutate(EXAMPLE_DATA, data.draw)
    assert_policy_or_config_error(lambda: parse_policy(mutated, source="fuzz.toml", text=EXAMPLE_TEXT))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "replyclock.toml"
        path.write_text(toml_document(mutated), encoding="utf-8")
        assert_policy_or_config_error(lambda: load_policy(path))


damage = st.one_of(
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=30)),
    st.tuples(
        st.just("insert"),
        st.integers(min_value=0),
        st.text(alphabet="[]{}=\".,#\n' \\abc019:-_{}", max_size=8),
    ),
    st.tuples(st.just("duplicate-line"), st.integers(min_value=0), st.integers(min_value=0)),
    st.tuples(st.just("drop-line"), st.integers(min_value=0), st.integers(min_value=0)),
    st.tuples(st.just("swap-lines"), st.integers(min_value=0), st.integers(min_value=0)),
)


def damaged(text: str, operations: list[tuple[str, int, object]]) -> str:
    for kind, where, what in operations:
        if kind == "delete":
            at = where % (len(text) + 1)
            assert isinstance(what, int)
            text = text[:at] + text[at + what :]
        elif kind == "insert":
            at = where % (len(text) + 1)
            text = text[:at] + str(what) + text[at:]
        else:
            lines = text.splitlines(keepends=True) or [""]
            first = where % len(lines)
            assert isinstance(what, int)
            second = what % len(lines)
            if kind == "duplicate-line":
                lines.insert(first, lines[first])
            elif kind == "drop-line":
                del lines[first]
            else:
                lines[first], lines[second] = lines[second], lines[first]
            text = "".join(lines)
    return text


@FUZZ
@given(st.lists(damage, min_size=1, max_size=4))
def test_fuzz_text_damage(operations: list[tuple[str, int, object]]) -> None:
    text = damaged(EXAMPLE_TEXT, operations)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "replyclock.toml"
        path.write_text(text, encoding="utf-8")
        assert_policy_or_config_error(lambda: load_policy(path))
    # The locator alone never raises, whatever the text; on text tomllib accepts it finds every key.
    locator = KeyLocator(text)
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    lines = text.splitlines()
    for key_path in all_paths(parsed):
        line = locator.exact_line_of(key_path)
        assert line is not None, key_path
        last = key_path[-1]
        if isinstance(last, str) and BARE_KEY.match(last):
            assert last in lines[line - 1], (key_path, line)
