"""The shape of ``replyclock.toml`` as pydantic models: every table, its keys and their types.

These models are the one list of the keys each table takes: the validator (bot.config.validator)
reads its allowed keys from them (`keys_of`), and `json_schema` turns them into the JSON Schema
that ``replyclock schema`` prints and that TOML editors (Taplo, Even Better TOML) use to complete
and check the file. The validator still does the value checks itself, because its messages (the
line, the key path, "did you mean", what to write instead) say more than a schema can; the schema
gives an editor the same keys and types, and patterns for the value formats.

Dates (TOML local dates such as ``2026-12-24``) appear to a JSON Schema as strings, as editors
pass them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, Required

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

Duration = Annotated[
    str,
    Field(
        pattern=r"^\s*([0-9]+\s*[wdhmsWDHMS]\s*)+$",
        description='Numbers with units w, d, h, m, s: "24h", "1h30m", "2d", "90s".',
    ),
]
Period = Annotated[
    str,
    Field(
        pattern=r"^\s*[0-9]{1,2}:[0-9]{2}\s*-\s*[0-9]{1,2}:[0-9]{2}\s*$",
        description='Open hours "HH:MM-HH:MM" in local time; the end may be "24:00".',
    ),
]
DateText = Annotated[
    str, Field(pattern=r"^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}\s*$", description="A date such as 2026-12-24.")
]
DayKey = Annotated[
    str,
    Field(
        pattern=r"^\s*[A-Za-z]{3}(\s*-\s*[A-Za-z]{3})?\s*$",
        description="A day (mon ... sun) or a forward range such as mon-fri.",
    ),
]
Channel = Annotated[
    str,
    Field(
        pattern=r"^(#[^\s#@,.]{1,80}|[CG][A-Z0-9]{6,})$",
        description='A Slack channel "#care" or a channel id "C0123ABCD".',
    ),
]
Language = Annotated[
    str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$", description='A language code: "en", "pt-BR".')
]
Name = Annotated[str, Field(min_length=1, pattern=r"\S")]
Names = list[Name]
Priority = Literal["low", "normal", "high", "urgent"]
Hours = Annotated[
    dict[DayKey, list[Period]],
    Field(description='Working hours: { mon-fri = ["09:00-17:00"], sat = ["10:00-14:00"] }.'),
]

_CLOSED: Final = ConfigDict(extra="forbid")


class HolidaysTable(TypedDict, total=False):
    """Public holidays from the holidays package."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    country: Required[Annotated[str, Field(description='ISO 3166 country code such as "DE".')]]
    subdivision: str


class SettingsTable(TypedDict, total=False):
    """[settings]"""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    conversation_gap: Duration
    default_team: Name
    admin_channel: Channel
    # The public edge (issue 11): see bot.core.policy.Settings.
    ack_greeting: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[^<>@{}\n]+$")]
    ack_overdue_wording: Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[^<>@{}\n]+$")]
    cross_team_actions: bool
    retention_outbox: Annotated[str, Field(pattern=r"^\s*(([0-9]+\s*[wdhmsWDHMS]\s*)+|off)\s*$")]
    retention_events: Annotated[str, Field(pattern=r"^\s*(([0-9]+\s*[wdhmsWDHMS]\s*)+|off)\s*$")]
    retention_text: Annotated[str, Field(pattern=r"^\s*(([0-9]+\s*[wdhmsWDHMS]\s*)+|off)\s*$")]


class CalendarTable(TypedDict, total=False):
    """[calendars.<name>]: when a team is at work."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    timezone: Required[Annotated[str, Field(description='An IANA time zone: "Europe/Berlin".')]]
    hours: Required[Hours]
    holidays: HolidaysTable
    closed: list[DateText]
    overrides: dict[DateText, list[Period]]
    weekend: Annotated[
        list[DayKey],
        Field(description='The weekend days, whatever the hours: ["sat", "sun"] (default), [] for none.'),
    ]


class ExpertTable(TypedDict, total=False):
    """[experts.<id>]: a person who answers."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    name: Required[Name]
    slack_id: Required[
        Annotated[str, Field(pattern=r"^[UW][A-Z0-9]{2,}$", description="Slack member id: U0123ABCD.")]
    ]
    email: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
    timezone: Required[str]
    hours: Hours
    topics: Names
    capacity: Annotated[int, Field(ge=1)]
    away_until: DateText
    holidays: HolidaysTable


class TeamTable(TypedDict, total=False):
    """[teams.<name>]"""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    channel: Required[Channel]
    experts: Required[Annotated[Names, Field(min_length=1)]]
    calendar: Required[Name]
    on_call: Name
    manager: Name
    language: Language
    display_name: Name
    digest: Annotated[
        str,
        Field(
            pattern=r"^\s*([Oo][Ff][Ff]|\S+\s+[0-9]{2}:[0-9]{2})\s*$",
            description='When the weekly digest is posted: "mon 09:00", or "off".',
        ),
    ]
    follow_the_sun: Annotated[
        bool,
        Field(description="Hand a conversation on when its owner's working hours end before its deadline."),
    ]
    # Issue 15: honest acknowledgements and "at risk" notices (bot.sim.forecast).
    forecast_ack: bool
    at_risk: bool
    forecast_percentile: Annotated[int, Field(ge=50, le=99)]


class StepTable(TypedDict, total=False):
    """One escalation step."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    after: Required[Duration]
    notify: Required[Literal["owner", "team_channel", "manager", "on_call"]]


class MatchTable(TypedDict, total=False):
    """Which conversations a policy covers."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    teams: Names
    accounts: Names
    priorities: list[Priority]


Fraction = Annotated[float, Field(gt=0, lt=1)]


class PolicyTable(TypedDict, total=False):
    """[[policies]]: the first that matches a conversation applies."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    name: Required[Name]
    clock: Literal["wall", "business"]
    calendar: Name
    first_response: Required[Duration]
    next_response: Duration
    weekend_first_response: Duration
    warn_at: list[Fraction] | Fraction
    nag_every: Duration
    claim_within: Duration
    reassign_if_silent: Duration
    resolution: Duration
    close_after_silence: Duration
    acknowledge: bool
    escalation: list[StepTable]
    match: MatchTable


class RuleTable(TypedDict, total=False):
    """[[routing]]: the first rule that matches a post decides team and priority."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    name: Name
    team: Required[Name]
    priority: Priority
    accounts: Names
    keywords: Names
    regex: Annotated[str, Field(description="A Python regular expression, ignoring case.")]
    authors: Names
    languages: list[Language]
    topics: Names


class AuthorsTable(TypedDict, total=False):
    """[authors]"""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    vip: Names
    ignore: Names


class AccountTable(TypedDict, total=False):
    """[accounts.<name>]: any other key goes to the connector (checked by ``replyclock check``)."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    kind: Required[
        Annotated[
            str,
            Field(
                pattern=r"^[a-z][a-z0-9_.-]*$",
                description='Connector kind: "x", "mastodon", "feed", "webhook" or a plug-in\'s.',
            ),
        ]
    ]
    own_ids: Names
    poll_interval: Duration
    can_reply: bool


class PolicyFile(TypedDict, total=False):
    """replyclock.toml: who answers which customer, and by when."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    settings: SettingsTable
    calendars: dict[str, CalendarTable]
    experts: dict[str, ExpertTable]
    teams: Required[Annotated[dict[str, TeamTable], Field(min_length=1)]]
    policies: Required[Annotated[list[PolicyTable], Field(min_length=1)]]
    routing: list[RuleTable]
    authors: AuthorsTable
    accounts: dict[str, AccountTable]
    acknowledgements: dict[str, dict[Language, str]]


def keys_of(table: type[Any]) -> tuple[str, ...]:
    """The keys a table takes, in the order the model declares them."""
    return tuple(name for name in table.__annotations__ if not name.startswith("_"))


def json_schema(connector_keys: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The JSON Schema of replyclock.toml.

    Args:
        connector_keys: connector kind -> the account keys its connector reads (see
            `connectors.base.Connector.settings_keys`); an account of such a kind may hold only
            those and the common keys. Kinds not given (plug-ins) take any keys.
    """
    schema = TypeAdapter(PolicyFile).json_schema()
    _name_patterns(schema)
    if connector_keys:
        account = schema["$defs"]["AccountTable"]
        account["properties"]["kind"]["examples"] = sorted(connector_keys)
        common = keys_of(AccountTable)
        account["allOf"] = [
            {
                "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                "then": {
                    "properties": dict.fromkeys((*common, *connector_keys[kind]), True),
                    "additionalProperties": False,
                },
            }
            for kind in sorted(connector_keys)
        ]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "replyclock.toml"}


def json_schema_text(connector_keys: Mapping[str, Sequence[str]] | None = None) -> str:
    """`json_schema` as the text ``replyclock schema`` prints (and examples/ holds)."""
    return json.dumps(json_schema(connector_keys), indent=2, ensure_ascii=False) + "\n"


def _name_patterns(node: object) -> None:
    """A table whose keys follow a pattern (days, dates) refuses other keys too."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in node:
            node["propertyNames"] = {**node.get("propertyNames", {}), "pattern": next(iter(patterns))}
        for value in node.values():
            _name_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _name_patterns(value)
