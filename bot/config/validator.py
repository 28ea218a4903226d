"""The validator: walks the parsed TOML section by section and builds the policy objects."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import Any, Final, Literal, TypeVar

from bot.config.fields import _Fields
from bot.config.helpers import _known, _parse_days, _quote, _suggest, _template_problem
from bot.config.locator import KeyLocator
from bot.config.problems import KeyPath, render_key
from bot.config.shape import (
    AccountTable,
    AuthorsTable,
    CalendarTable,
    ExpertTable,
    MatchTable,
    PolicyFile,
    PolicyTable,
    RuleTable,
    SettingsTable,
    StepTable,
    TeamTable,
    keys_of,
)
from bot.core.policy import (
    DEFAULT_WEEKEND,
    PRIORITIES,
    Account,
    CalendarSpec,
    DigestSchedule,
    EscalationStep,
    EscalationTarget,
    Expert,
    Period,
    Policy,
    Priority,
    RoutingRule,
    Settings,
    SlaPolicy,
    Team,
    WeekHours,
    format_duration,
)

T = TypeVar("T")
ESCALATION_TARGETS: Final[tuple[EscalationTarget, ...]] = ("owner", "team_channel", "manager", "on_call")
_PRIORITY_BY_NAME: Final[dict[str, Priority]] = {name: name for name in PRIORITIES}
_TARGET_BY_NAME: Final[dict[str, EscalationTarget]] = {name: name for name in ESCALATION_TARGETS}
_CLOCKS: Final[dict[str, Literal["wall", "business"]]] = {"wall": "wall", "business": "business"}
_TOP_KEYS = keys_of(PolicyFile)
_SETTINGS_KEYS = keys_of(SettingsTable)
_CALENDAR_KEYS = keys_of(CalendarTable)
_EXPERT_KEYS = keys_of(ExpertTable)
_TEAM_KEYS = keys_of(TeamTable)
_POLICY_KEYS = keys_of(PolicyTable)
_STEP_KEYS = keys_of(StepTable)
_MATCH_KEYS = keys_of(MatchTable)
_RULE_KEYS = keys_of(RuleTable)
_RULE_CONDITIONS = ("accounts", "keywords", "regex", "authors", "languages")
_AUTHOR_KEYS = keys_of(AuthorsTable)
_ACCOUNT_KEYS = keys_of(AccountTable)
_DEFAULT_EXPERT_HOURS: Final[WeekHours] = {day: ((540, 1020),) if day < 5 else () for day in range(7)}
_SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_.-]*$")


AccountCheck = Callable[[Account], Iterable[tuple[KeyPath, str]]]
"""Checks one account beyond its common keys (its connector's settings and secrets): each problem
as (key path inside the account's table, message); ``()`` for the account's table itself."""


class _Validator(_Fields):
    """Walks the parsed TOML, collecting problems and building the policy objects."""

    def __init__(
        self, source: str, locator: KeyLocator | None, account_check: AccountCheck | None = None
    ) -> None:
        super().__init__(source, locator)
        self.account_check = account_check

    # -- sections

    def calendars(self, data: Mapping[str, object]) -> dict[str, CalendarSpec]:
        out: dict[str, CalendarSpec] = {}
        for name, path, table in self.named_tables(data, "calendars", _CALENDAR_KEYS):
            zone = self.field(
                table, path, "timezone", self.timezone, required="an IANA time zone such as 'Europe/Berlin'"
            )
            hours = self.field(
                table,
                path,
                "hours",
                self.week_hours,
                required='working hours such as { mon-fri = ["09:00-17:00"] }',
            )
            spec = self.field(table, path, "holidays", self.holidays_spec)
            closed = self.field(table, path, "closed", self.list_of(self.date_value, "an array of dates"))
            overrides = self.field(table, path, "overrides", self.overrides)
            weekend = self.field(table, path, "weekend", self.weekend_days)
            if zone is None or hours is None or ("weekend" in table and weekend is None):
                continue
            out[name] = CalendarSpec(
                name=name,
                timezone=zone,
                hours=hours,
                holiday_country=spec[0] if spec else None,
                holiday_subdivision=spec[1] if spec else None,
                closed_dates=frozenset(closed or ()),
                overrides=overrides or {},
                weekend=weekend if weekend is not None else DEFAULT_WEEKEND,
            )
        return out

    def weekend_days(self, value: object, path: KeyPath) -> frozenset[int] | None:
        """A calendar's weekend: an array of day names or ranges (``["fri", "sat"]``, ``[]``)."""
        if not isinstance(value, list):
            self.wrong_type(path, 'an array of days such as ["sat", "sun"] ([] = no weekend)', value)
            return None
        days: set[int] = set()
        ok = True
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.wrong_type((*path, index), "a day such as 'sat'", item)
                ok = False
                continue
            parsed = _parse_days(item)
            if isinstance(parsed, str):
                self.add((*path, index), parsed)
                ok = False
                continue
            days.update(parsed)
        return frozenset(days) if ok else None

    def overrides(self, value: object, path: KeyPath) -> dict[date, tuple[Period, ...]] | None:
        table = self.table(value, path, 'a table of dates, such as { "2026-12-31" = ["09:00-12:00"] }')
        if table is None:
            return None
        out: dict[date, tuple[Period, ...]] = {}
        for key, raw in table.items():
            day = self.date_value(key, (*path, key))
            periods = self.periods(raw, (*path, key))
            if day is not None and periods is not None:
                out[day] = periods
        return out

    def experts(self, data: Mapping[str, object]) -> dict[str, Expert]:
        out: dict[str, Expert] = {}
        slack_owner: dict[str, str] = {}
        for expert_id, path, table in self.named_tables(data, "experts", _EXPERT_KEYS):
            name = self.field(table, path, "name", self.string, required="the expert's name")
            slack_id = self.field(
                table,
                path,
                "slack_id",
                self.matching(
                    _SLACK_USER_RE,
                    "a Slack member id starting with U or W, such as 'U0123ABCD' "
                    "(Slack profile > ⋮ > Copy member ID)",
                ),
                required="a Slack member id such as 'U0123ABCD'",
            )
            email = self.field(table, path, "email", self.matching(_EMAIL_RE, "an e-mail address"))
            zone = self.field(
                table, path, "timezone", self.timezone, required="an IANA time zone such as 'Europe/Berlin'"
            )
            hours = self.field(table, path, "hours", self.week_hours)
            topics = self.field(table, path, "topics", self.string_list)
            capacity = self.field(table, path, "capacity", self.positive_integer)
            away_until = self.field(table, path, "away_until", self.date_value)
            spec = self.field(table, path, "holidays", self.holidays_spec)
            if slack_id is not None:
                if slack_id in slack_owner:
                    self.add(
                        (*path, "slack_id"),
                        f"Slack id {slack_id} is also used by expert {_quote(slack_owner[slack_id])}",
                    )
                slack_owner.setdefault(slack_id, expert_id)
            if name is None or slack_id is None or zone is None:
                continue
            if "hours" in table and hours is None:
                continue
            out[expert_id] = Expert(
                id=expert_id,
                name=name,
                slack_id=slack_id,
                timezone=zone,
                hours=hours if hours is not None else dict(_DEFAULT_EXPERT_HOURS),
                topics=topics or (),
                capacity=capacity if capacity is not None else 10,
                away_until=away_until,
                holiday_country=spec[0] if spec else None,
                holiday_subdivision=spec[1] if spec else None,
                email=email,
            )
        return out

    def teams(
        self, data: Mapping[str, object], calendars: Collection[str], experts: Collection[str]
    ) -> dict[str, Team]:
        out: dict[str, Team] = {}
        expert_ref = self.reference("expert", experts, "add an [experts.<id>] table")
        calendar_ref = self.reference("calendar", calendars, "add a [calendars.<name>] table")
        for name, path, table in self.named_tables(data, "teams", _TEAM_KEYS):
            channel = self.field(
                table, path, "channel", self.channel, required="a Slack channel such as '#care'"
            )
            members = self.field(
                table,
                path,
                "experts",
                self.list_of(expert_ref, "an array of expert ids"),
                required="an array of expert ids",
            )
            if "experts" in table and isinstance(table["experts"], list):
                self.unique(table["experts"], (*path, "experts"), "expert")
                if not table["experts"]:
                    self.add((*path, "experts"), "a team needs at least one expert")
            calendar = self.field(table, path, "calendar", calendar_ref, required="the name of a calendar")
            on_call = self.field(table, path, "on_call", expert_ref)
            manager = self.field(table, path, "manager", expert_ref)
            language = self.field(table, path, "language", self.language)
            display_name = self.field(table, path, "display_name", self.string)
            digest: DigestSchedule | Literal["off"] | None = self.field(
                table, path, "digest", self.digest_time
            )
            follow_the_sun = self.field(table, path, "follow_the_sun", self.boolean)
            forecast_ack = self.field(table, path, "forecast_ack", self.boolean)
            at_risk = self.field(table, path, "at_risk", self.boolean)
            percentile = self.field(table, path, "forecast_percentile", self.positive_integer)
            if percentile is not None and not 50 <= percentile <= 99:
                self.add((*path, "forecast_percentile"), f"must be from 50 to 99, got {percentile}")
                percentile = None
            if channel is None or members is None or calendar is None:
                continue
            out[name] = Team(
                name=name,
                channel=channel,
                experts=tuple(dict.fromkeys(members)),
                calendar=calendar,
                on_call=on_call,
                manager=manager,
                language=language or "en",
                display_name=display_name,
                digest=None if digest == "off" else (digest if digest is not None else DigestSchedule()),
                follow_the_sun=bool(follow_the_sun),
                forecast_ack=bool(forecast_ack),
                at_risk=bool(at_risk),
                forecast_percentile=percentile or 80,
            )
        if data.get("teams", {}) == {}:
            self.add(("teams",), "no teams are defined (add a [teams.<name>] table)")
        return out

    def accounts(
        self, data: Mapping[str, object], teams: Collection[str] | None = None
    ) -> dict[str, Account]:
        out: dict[str, Account] = {}
        for name, path, table in self.named_tables(data, "accounts"):
            flagged: set[str] = set()
            for key in table:
                if key in _ACCOUNT_KEYS:
                    continue
                guess = _suggest(str(key), _ACCOUNT_KEYS, cutoff=0.8)
                if guess is not None:
                    self.typos.add((path, guess))
                    flagged.add(key)
                    self.add((*path, key), f"unknown key {_quote(str(key))} (did you mean '{guess}'?)")
            kind = self.field(
                table,
                path,
                "kind",
                self.matching(_KIND_RE, "a connector kind such as 'x', 'mastodon', 'feed' or 'webhook'"),
                required="a connector kind such as 'x', 'mastodon', 'feed' or 'webhook'",
            )
            own_ids = self.field(table, path, "own_ids", self.string_list)
            poll_interval = self.field(table, path, "poll_interval", self.duration)
            can_reply = self.field(table, path, "can_reply", self.boolean)
            if kind is None:
                continue
            out[name] = Account(
                name=name,
                kind=kind,
                own_ids=own_ids or (),
                poll_interval=poll_interval if poll_interval is not None else timedelta(minutes=1),
                can_reply=can_reply if can_reply is not None else True,
                settings={key: value for key, value in table.items() if key not in _ACCOUNT_KEYS},
            )
            if self.account_check is not None:
                for where, message in self.account_check(out[name]):
                    if not (where and where[0] in flagged):
                        self.add((*path, *where), message)
            search_team = table.get("search_team")  # x: the team that gets posts found by `search`
            if teams is not None and isinstance(search_team, str) and search_team not in teams:
                self.add(
                    (*path, "search_team"), f"unknown team {_quote(search_team)} (known: {_known(teams)})"
                )
        return out

    def settings(self, data: Mapping[str, object], teams: Collection[str]) -> Settings:
        table = self.section(data, "settings")
        path: KeyPath = ("settings",)
        self.check_keys(table, path, _SETTINGS_KEYS)
        gap = self.field(table, path, "conversation_gap", self.duration)
        default_team = self.field(
            table, path, "default_team", self.reference("team", teams, "add a [teams.<name>] table")
        )
        admin_channel = self.field(table, path, "admin_channel", self.channel)
        edge = self.edge_settings(table, path)
        return Settings(
            conversation_gap=gap if gap is not None else timedelta(hours=24),
            default_team=default_team,
            admin_channel=admin_channel,
            **edge,
        )

    def edge_settings(self, table: Mapping[str, object], path: KeyPath) -> dict[str, Any]:
        """The public-edge settings (issue 11): greeting, overdue wording, cross-team, retention."""
        out: dict[str, Any] = {}
        for key in ("ack_greeting", "ack_overdue_wording"):
            value = self.field(table, path, key, self.string)
            if value is None:
                continue
            if not value.strip() or len(value) > 80 or any(ch in value for ch in "<>@{}\n"):
                self.add((*path, key), "must be 1-80 characters of plain text (no < > @ { } or newline)")
                continue
            out[key] = value.strip()
        cross = self.field(table, path, "cross_team_actions", self.boolean)
        if cross is not None:
            out["cross_team_actions"] = cross
        for key in ("retention_outbox", "retention_events", "retention_text"):
            if table.get(key) == "off":
                out[key] = None
                continue
            kept = self.field(table, path, key, self.duration)
            if kept is not None:
                out[key] = kept
        return out

    def authors(self, data: Mapping[str, object]) -> tuple[frozenset[str], frozenset[str]]:
        table = self.section(data, "authors")
        path: KeyPath = ("authors",)
        self.check_keys(table, path, _AUTHOR_KEYS)
        vip = self.field(table, path, "vip", self.string_list) or ()
        ignore = self.field(table, path, "ignore", self.string_list) or ()
        raw_ignore = table.get("ignore")
        if isinstance(raw_ignore, list):
            for index, item in enumerate(raw_ignore):
                if isinstance(item, str) and item in vip:
                    self.add((*path, "ignore", index), f"{_quote(item)} is listed both as vip and as ignore")
        return frozenset(vip), frozenset(ignore)

    def policies(
        self,
        data: Mapping[str, object],
        calendars: Collection[str],
        teams: Collection[str],
        accounts: Collection[str],
    ) -> list[tuple[KeyPath, SlaPolicy]]:
        out: list[tuple[KeyPath, SlaPolicy]] = []
        names: dict[str, KeyPath] = {}
        catch_all: tuple[KeyPath, str] | None = None
        unsure = False  # a policy's 'match' is broken, so whether a catch-all exists is unknown
        entries = self.array_of_tables(data, "policies")
        if data.get("policies", []) == []:
            self.add(("policies",), "no SLA policies are defined (add at least one [[policies]] table)")
        calendar_ref = self.reference("calendar", calendars, "add a [calendars.<name>] table")
        for path, table in entries:
            self.check_keys(table, path, _POLICY_KEYS)
            name = self.field(table, path, "name", self.string, required="a policy name")
            if name is not None:
                if name in names:
                    self.add(
                        (*path, "name"),
                        f"duplicate policy name {_quote(name)} (also {render_key(names[name])})",
                    )
                names.setdefault(name, path)
            clock: Literal["wall", "business"] | None = self.field(
                table, path, "clock", self.choice(_CLOCKS, "clock")
            )
            calendar = self.field(table, path, "calendar", calendar_ref)
            first = self.field(
                table, path, "first_response", self.duration, required="a duration such as 24h"
            )
            next_response = self.field(table, path, "next_response", self.duration)
            weekend = self.field(table, path, "weekend_first_response", self.duration)
            warn_at = self.field(table, path, "warn_at", self.fractions)
            nag_every = self.field(table, path, "nag_every", self.duration)
            claim_within = self.field(table, path, "claim_within", self.duration)
            reassign_if_silent = self.field(table, path, "reassign_if_silent", self.duration)
            resolution = self.field(table, path, "resolution", self.duration)
            close_after_silence = self.field(table, path, "close_after_silence", self.duration)
            acknowledge = self.field(table, path, "acknowledge", self.boolean)
            escalation = self.field(table, path, "escalation", self.escalation)
            match = self.field(table, path, "match", self.match_spec(teams, accounts))
            clock_name: Literal["wall", "business"] = clock or "wall"
            if clock_name == "business" and "calendar" not in table:
                self.add(
                    (*path, "calendar"),
                    'a business clock needs a calendar (add calendar = "<name>"; '
                    f"known: {_known(calendars) or 'none'})",
                )
            elif "weekend_first_response" in table and clock_name == "business":
                self.add(
                    (*path, "weekend_first_response"),
                    "only applies to a wall clock (a business clock already skips closed days); "
                    'remove it or use clock = "wall"',
                )
            elif "weekend_first_response" in table and "calendar" not in table:
                self.add(
                    (*path, "weekend_first_response"),
                    "needs a calendar to tell working days from weekends and holidays "
                    f'(add calendar = "<name>" to this policy; known: {_known(calendars) or "none"})',
                )
            raw_match = table.get("match")
            if raw_match is not None and not isinstance(raw_match, dict):
                unsure = True
            is_catch_all = raw_match is None or (
                isinstance(raw_match, dict) and not any(raw_match.get(key) for key in _MATCH_KEYS)
            )
            if catch_all is not None:
                self.add(
                    path,
                    f"policy {_quote(name or '?')} can never apply: {_quote(catch_all[1])} "
                    f"({render_key(catch_all[0])}) before it matches every conversation",
                )
            elif is_catch_all:
                catch_all = (path, name or "?")
            if (
                name is None
                or first is None
                or any(
                    key in table and value is None
                    for key, value in (
                        ("clock", clock),
                        ("calendar", calendar),
                        ("next_response", next_response),
                        ("weekend_first_response", weekend),
                        ("warn_at", warn_at),
                        ("nag_every", nag_every),
                        ("claim_within", claim_within),
                        ("reassign_if_silent", reassign_if_silent),
                        ("resolution", resolution),
                        ("close_after_silence", close_after_silence),
                        ("acknowledge", acknowledge),
                        ("escalation", escalation),
                        ("match", match),
                    )
                )
            ):
                continue
            teams_, accounts_, priorities = match or ((), (), ())
            out.append(
                (
                    path,
                    SlaPolicy(
                        name=name,
                        clock=clock_name,
                        calendar=calendar,
                        first_response=first,
                        next_response=next_response,
                        weekend_first_response=weekend,
                        warn_at=warn_at if warn_at is not None else (0.75,),
                        nag_every=nag_every if nag_every is not None else timedelta(hours=1),
                        escalation=escalation or (),
                        claim_within=claim_within,
                        reassign_if_silent=reassign_if_silent,
                        resolution=resolution,
                        close_after_silence=close_after_silence,
                        acknowledge=bool(acknowledge),
                        match_teams=teams_,
                        match_accounts=accounts_,
                        match_priorities=priorities,
                    ),
                )
            )
        if entries and catch_all is None and not unsure:
            last = entries[-1][0]
            self.add(
                (*last, "match"),
                "the last policy must be a catch-all without 'match', so that every conversation "
                "gets a policy (add a final [[policies]] table without 'match')",
            )
        return out

    def choice(self, options: Mapping[str, T], what: str) -> Callable[[object, KeyPath], T | None]:
        def convert(value: object, path: KeyPath) -> T | None:
            text = self.string(value, path)
            if text is None:
                return None
            if text in options:
                return options[text]
            allowed = ", ".join(f"'{option}'" for option in options)
            guess = _suggest(text, options)
            hint = f"did you mean '{guess}'? " if guess else ""
            self.add(path, f"unknown {what} {_quote(text)} ({hint}expected one of {allowed})")
            return None

        return convert

    def escalation(self, value: object, path: KeyPath) -> tuple[EscalationStep, ...] | None:
        if not isinstance(value, list):
            self.wrong_type(
                path, 'an array of steps such as [{ after = "1h", notify = "team_channel" }]', value
            )
            return None
        steps: list[EscalationStep] = []
        ok = True
        for index, item in enumerate(value):
            where: KeyPath = (*path, index)
            table = self.table(item, where, 'a step such as { after = "1h", notify = "manager" }')
            if table is None:
                ok = False
                continue
            self.check_keys(table, where, _STEP_KEYS)
            after = self.field(
                table, where, "after", self.any_duration, required="a duration past the deadline"
            )
            notify: EscalationTarget | None = self.field(
                table,
                where,
                "notify",
                self.choice(_TARGET_BY_NAME, "escalation target"),
                required="one of 'owner', 'team_channel', 'manager', 'on_call'",
            )
            if after is None or notify is None:
                ok = False
                continue
            if steps and after < steps[-1].after:
                self.add(
                    (*where, "after"),
                    f"steps must be in order of 'after': {format_duration(after)} comes after "
                    f"{format_duration(steps[-1].after)}",
                )
                ok = False
            steps.append(EscalationStep(after=after, notify=notify))
        return tuple(steps) if ok else None

    def match_spec(
        self, teams: Collection[str], accounts: Collection[str]
    ) -> Callable[[object, KeyPath], tuple[tuple[str, ...], tuple[str, ...], tuple[Priority, ...]] | None]:
        team_list = self.list_of(
            self.reference("team", teams, "add a [teams.<name>] table"), "an array of team names"
        )
        account_list = self.list_of(
            self.reference("account", accounts, "add an [accounts.<name>] table"), "an array of account names"
        )
        priority_list: Callable[[object, KeyPath], tuple[Priority, ...] | None] = self.list_of(
            self.choice(_PRIORITY_BY_NAME, "priority"), "an array of priorities"
        )

        def convert(
            value: object, path: KeyPath
        ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[Priority, ...]] | None:
            table = self.table(
                value, path, 'a table such as { teams = ["billing"], priorities = ["urgent"] }'
            )
            if table is None:
                return None
            self.check_keys(table, path, _MATCH_KEYS)
            found_teams = self.field(table, path, "teams", team_list)
            found_accounts = self.field(table, path, "accounts", account_list)
            found_priorities: tuple[Priority, ...] | None = self.field(
                table, path, "priorities", priority_list
            )
            if any(
                key in table and value is None
                for key, value in zip(
                    _MATCH_KEYS, (found_teams, found_accounts, found_priorities), strict=True
                )
            ):
                return None
            return (found_teams or (), found_accounts or (), found_priorities or ())

        return convert

    def regex(self, value: object, path: KeyPath) -> re.Pattern[str] | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return re.compile(text, re.IGNORECASE)
        except re.error as error:
            where = f" at position {error.pos}" if error.pos is not None else ""
            self.add(path, f"bad regular expression {_quote(text)}: {error.msg}{where}")
        except (OverflowError, RecursionError, ValueError) as error:
            self.add(path, f"bad regular expression {_quote(text)}: {error}")
        return None

    def routing(
        self,
        data: Mapping[str, object],
        team_names: Collection[str],
        accounts: Collection[str],
        teams: Mapping[str, Team],
        experts: Mapping[str, Expert],
    ) -> tuple[RoutingRule, ...]:
        out: list[RoutingRule] = []
        team_ref = self.reference("team", team_names, "add a [teams.<name>] table")
        account_list = self.list_of(
            self.reference("account", accounts, "add an [accounts.<name>] table"), "an array of account names"
        )
        language_list = self.list_of(self.language, "an array of language codes")
        names: dict[str, KeyPath] = {}
        unconditional: tuple[KeyPath, str] | None = None
        for number, (path, table) in enumerate(self.array_of_tables(data, "routing"), start=1):
            self.check_keys(table, path, _RULE_KEYS)
            name = self.field(table, path, "name", self.string) or f"rule-{number}"
            if name in names:
                self.add(
                    (*path, "name"), f"duplicate rule name {_quote(name)} (also {render_key(names[name])})"
                )
            names.setdefault(name, path)
            team = self.field(table, path, "team", team_ref, required="the name of a team")
            priority: Priority | None = self.field(
                table, path, "priority", self.choice(_PRIORITY_BY_NAME, "priority")
            )
            rule_accounts = self.field(table, path, "accounts", account_list)
            keywords = self.field(table, path, "keywords", self.string_list)
            pattern = self.field(table, path, "regex", self.regex)
            authors = self.field(table, path, "authors", self.string_list)
            languages = self.field(table, path, "languages", language_list)
            topics = self.field(table, path, "topics", self.string_list)
            if unconditional is not None:
                self.add(
                    path,
                    f"rule {_quote(name)} can never apply: {_quote(unconditional[1])} "
                    f"({render_key(unconditional[0])}) before it has no conditions and matches every post",
                )
            elif not any(key in table for key in _RULE_CONDITIONS):
                unconditional = (path, name)
            members = teams[team].experts if team is not None and team in teams else None
            raw_topics = table.get("topics")
            # Only when the team and all its experts are valid, so one mistake is reported once.
            if (
                team is not None
                and members is not None
                and isinstance(raw_topics, list)
                and all(member in experts for member in members)
            ):
                offered = {topic for member in members for topic in experts[member].topics}
                for position, topic in enumerate(raw_topics):
                    if isinstance(topic, str) and topic.strip() and topic not in offered:
                        known = f"their topics: {_known(offered)}" if offered else "none lists any topics"
                        self.add(
                            (*path, "topics", position),
                            f"no expert of team {_quote(team)} lists topic {_quote(topic)} ({known})",
                        )
            if team is None:
                continue
            out.append(
                RoutingRule(
                    name=name,
                    team=team,
                    priority=priority or "normal",
                    accounts=rule_accounts or (),
                    keywords=keywords or (),
                    regex=pattern,
                    authors=authors or (),
                    languages=languages or (),
                    topics=topics or (),
                )
            )
        return tuple(out)

    def acknowledgements(
        self, data: Mapping[str, object], teams: Collection[str]
    ) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for key, raw in self.section(data, "acknowledgements").items():
            path: KeyPath = ("acknowledgements", key)
            if key != "default" and key not in teams:
                known = ", ".join(["'default'", *(f"'{team}'" for team in sorted(teams))])
                self.add(path, f"unknown team {_quote(key)} (expected one of {known})")
            table = self.table(
                raw, path, 'a table of language codes to templates, such as { en = "Thanks {author}!" }'
            )
            if table is None:
                continue
            templates: dict[str, str] = {}
            for language, template in table.items():
                where: KeyPath = (*path, language)
                if not _LANGUAGE_RE.match(str(language)):
                    self.add(where, f"bad language code {_quote(str(language))} (expected e.g. en or de)")
                    continue
                text = self.string(template, where)
                if text is None:
                    continue
                problem = _template_problem(text)
                if problem is not None:
                    self.add(where, problem)
                    continue
                templates[language] = text
            out[key] = templates
        return out

    # -- cross checks

    def ladder_targets(self, entries: Sequence[tuple[KeyPath, SlaPolicy]], teams: Mapping[str, Team]) -> None:
        for path, policy in entries:
            covered = [teams[name] for name in (policy.match_teams or tuple(teams)) if name in teams]
            for index, step in enumerate(policy.escalation):
                if step.notify == "manager":
                    missing = [team.name for team in covered if team.manager is None]
                elif step.notify == "on_call":
                    missing = [team.name for team in covered if team.on_call is None]
                else:
                    continue
                if missing:
                    self.add(
                        (*path, "escalation", index, "notify"),
                        f"escalates to '{step.notify}', but team{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} {'have' if len(missing) > 1 else 'has'} no {step.notify} "
                        f'(set {step.notify} = "<expert id>" in [teams.<name>])',
                    )

    def acknowledgement_coverage(self, entries: Sequence[tuple[KeyPath, SlaPolicy]], policy: Policy) -> None:
        for path, sla in entries:
            if not sla.acknowledge:
                continue
            for name in sla.match_teams or tuple(policy.teams):
                team = policy.teams.get(name)
                if team is None or policy.acknowledgement_template(team=name, language=team.language):
                    continue
                languages = _quote(team.language) + (" or 'en'" if team.language != "en" else "")
                self.add(
                    (*path, "acknowledge"),
                    f"acknowledgements are on, but there is no template for team {_quote(name)} in "
                    f'{languages} (add {team.language} = "..." under '
                    f"[acknowledgements.{name}] or [acknowledgements.default])",
                )

    # -- everything

    def run(self, data: Mapping[str, object]) -> Policy | None:
        self.check_keys(data, (), _TOP_KEYS)
        raw_names = {
            section: set(self.section_keys(data, section))
            for section in ("calendars", "experts", "teams", "accounts")
        }
        calendars = self.calendars(data)
        experts = self.experts(data)
        teams = self.teams(data, raw_names["calendars"], raw_names["experts"])
        accounts = self.accounts(data, raw_names["teams"])
        settings = self.settings(data, raw_names["teams"])
        vip, ignored = self.authors(data)
        entries = self.policies(data, raw_names["calendars"], raw_names["teams"], raw_names["accounts"])
        rules = self.routing(data, raw_names["teams"], raw_names["accounts"], teams, experts)
        acknowledgements = self.acknowledgements(data, raw_names["teams"])
        policy = Policy(
            source=self.source,
            settings=settings,
            calendars=calendars,
            experts=experts,
            teams=teams,
            policies=tuple(sla for _, sla in entries),
            rules=rules,
            accounts=accounts,
            vip_authors=vip,
            ignored_authors=ignored,
            acknowledgements=acknowledgements,
        )
        self.ladder_targets(entries, teams)
        self.acknowledgement_coverage(entries, policy)
        return None if self.problems else policy

    def section_keys(self, data: Mapping[str, object], key: str) -> list[str]:
        value = data.get(key)
        return [str(name) for name in value] if isinstance(value, dict) else []
