"""A readable summary of a validated policy, for ``replyclock check``."""

from __future__ import annotations

from bot.config.helpers import _period_text
from bot.core.policy import (
    WEEKDAY_NAMES,
    Period,
    Policy,
    WeekHours,
    format_duration,
)


def _hours_text(hours: WeekHours) -> str:
    groups: list[tuple[int, int, tuple[Period, ...]]] = []
    for day in range(7):
        periods = hours.get(day, ())
        if groups and groups[-1][2] == periods and groups[-1][1] == day - 1:
            groups[-1] = (groups[-1][0], day, periods)
        else:
            groups.append((day, day, periods))
    parts = []
    for first, last, periods in groups:
        if not periods:
            continue
        days = WEEKDAY_NAMES[first] if first == last else f"{WEEKDAY_NAMES[first]}-{WEEKDAY_NAMES[last]}"
        parts.append(f"{days} {', '.join(_period_text(period) for period in periods)}")
    return "; ".join(parts) or "always closed"


def _holiday_text(country: str | None, subdivision: str | None) -> str:
    if country is None:
        return "no public holidays"
    return f"holidays {country}" + (f"-{subdivision}" if subdivision else "")


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def summarize(policy: Policy) -> str:
    """A readable multi-line summary of a validated policy, for ``replyclock check``."""
    lines = [
        f"{policy.source}: "
        + ", ".join(
            [
                _plural(len(policy.calendars), "calendar"),
                _plural(len(policy.experts), "expert"),
                _plural(len(policy.teams), "team"),
                _plural(len(policy.policies), "SLA policy", "SLA policies"),
                _plural(len(policy.rules), "routing rule"),
                _plural(len(policy.accounts), "account"),
            ]
        ),
        "",
        "Settings: conversation gap "
        + format_duration(policy.settings.conversation_gap)
        + f", default team {policy.settings.default_team or '(none)'}"
        + f", admin channel {policy.settings.admin_channel or '(none)'}",
    ]
    lines += ["", "Calendars:"]
    for calendar in policy.calendars.values():
        extras = [_holiday_text(calendar.holiday_country, calendar.holiday_subdivision)]
        if calendar.closed_dates:
            extras.append(_plural(len(calendar.closed_dates), "closed date"))
        if calendar.overrides:
            extras.append(_plural(len(calendar.overrides), "override"))
        lines.append(
            f"  {calendar.name}: {calendar.timezone}, {_hours_text(calendar.hours)}; {', '.join(extras)}"
        )
    lines += ["", "Teams:"]
    for team in policy.teams.values():
        label = f"{team.name} ({team.display_name})" if team.display_name else team.name
        lines.append(
            f"  {label}: {team.channel}, calendar {team.calendar}, language {team.language}; "
            f"experts {', '.join(team.experts)}; on call {team.on_call or '-'}; manager {team.manager or '-'}; "
            f"digest {team.digest or 'off'}"
        )
    lines += ["", "Experts:"]
    for expert in policy.experts.values():
        details = [expert.timezone, _hours_text(expert.hours), f"capacity {expert.capacity}"]
        if expert.topics:
            details.append(f"topics {', '.join(expert.topics)}")
        if expert.away_until:
            details.append(f"away until {expert.away_until.isoformat()}")
        lines.append(f"  {expert.id} ({expert.name}, {expert.slack_id}): {'; '.join(details)}")
    lines += ["", "SLA policies (the first that matches applies):"]
    for number, sla in enumerate(policy.policies, start=1):
        clock = f"business clock on {sla.calendar}" if sla.clock == "business" else "wall clock"
        if sla.clock == "wall" and sla.calendar:
            clock += f" ({sla.calendar} for weekends and holidays)"
        targets = [f"first response {format_duration(sla.first_response)}"]
        if sla.weekend_first_response is not None:
            targets.append(f"{format_duration(sla.weekend_first_response)} from a weekend day or holiday")
        if sla.next_response is not None:
            targets.append(f"next response {format_duration(sla.next_response)}")
        if sla.claim_within is not None:
            targets.append(f"claim within {format_duration(sla.claim_within)}")
        if sla.reassign_if_silent is not None:
            targets.append(f"reassign after {format_duration(sla.reassign_if_silent)} of owner silence")
        if sla.resolution is not None:
            targets.append(f"resolution {format_duration(sla.resolution)}")
        if sla.close_after_silence is not None:
            targets.append(f"close after {format_duration(sla.close_after_silence)} of customer silence")
        conditions = [
            f"{label} {', '.join(values)}"
            for label, values in (
                ("teams", sla.match_teams),
                ("accounts", sla.match_accounts),
                ("priorities", sla.match_priorities),
            )
            if values
        ]
        warn = ", ".join(f"{fraction:.0%}" for fraction in sla.warn_at) or "never"
        ladder = (
            ", ".join(f"+{format_duration(step.after)} {step.notify}" for step in sla.escalation) or "none"
        )
        lines.append(f"  {number}. {sla.name} [{'; '.join(conditions) or 'everything else'}]: {clock}")
        lines.append(f"     {', '.join(targets)}")
        lines.append(
            f"     warn at {warn}; nag every {format_duration(sla.nag_every)}; escalation {ladder}; "
            f"acknowledge {'yes' if sla.acknowledge else 'no'}"
        )
    lines += ["", "Routing rules (the first that matches decides):"]
    for number, rule in enumerate(policy.rules, start=1):
        conditions = [
            f"{label} {', '.join(values)}"
            for label, values in (
                ("accounts", rule.accounts),
                ("keywords", rule.keywords),
                ("authors", rule.authors),
                ("languages", rule.languages),
            )
            if values
        ]
        if rule.regex is not None:
            conditions.append(f"regex /{rule.regex.pattern}/")
        topics = f", topics {', '.join(rule.topics)}" if rule.topics else ""
        lines.append(
            f"  {number}. {rule.name}: {' and '.join(conditions) or 'every post'} -> "
            f"team {rule.team}, {rule.priority}{topics}"
        )
    if not policy.rules:
        lines.append("  (none)")
    if policy.settings.default_team:
        lines.append(f"  otherwise -> team {policy.settings.default_team}")
    lines += ["", "Accounts:"]
    for account in policy.accounts.values():
        extra = f"; settings {', '.join(sorted(account.settings))}" if account.settings else ""
        own = f"; own ids {', '.join(account.own_ids)}" if account.own_ids else ""
        lines.append(
            f"  {account.name}: {account.kind}, poll every {format_duration(account.poll_interval)}, "
            f"{'replies' if account.can_reply else 'read-only'}{own}{extra}"
        )
    if not policy.accounts:
        lines.append("  (none)")
    lines += [
        "",
        f"Authors: {len(policy.vip_authors)} VIP, {len(policy.ignored_authors)} ignored",
        "Acknowledgements: "
        + (
            "; ".join(
                f"{key} ({', '.join(sorted(templates))})"
                for key, templates in policy.acknowledgements.items()
            )
            or "none"
        ),
    ]
    return "\n".join(lines)
