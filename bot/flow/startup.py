"""Configuration problems worth telling the admin channel when a process starts.

The policy file is validated before anything runs (`bot.config`); what is left are choices that
are valid but probably not meant: a team whose customers will get another language than the
team's, a policy that waits on customers forever. Each is one line of plain text.
"""

from __future__ import annotations

from babel import Locale, UnknownLocaleError

from bot.core.policy import Policy


def configuration_notices(policy: Policy) -> list[str]:
    """Valid but doubtful settings, as sentences for the admin channel (pure)."""
    notices: list[str] = []
    acknowledging = [sla for sla in policy.policies if sla.acknowledge]
    for name, team in policy.teams.items():
        try:
            Locale.parse(team.language.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            notices.append(
                f"team {name}: language {team.language!r} is unknown to Babel; dates in its "
                "acknowledgements are written in English"
            )
        covered = any(
            sla.matches(team=name, account=a, priority="normal")
            for sla in acknowledging
            for a in policy.accounts
        )
        if not covered:
            continue
        primary = team.language.split("-")[0]
        tables = (policy.acknowledgements.get(name, {}), policy.acknowledgements.get("default", {}))
        if not any(team.language in table or primary in table for table in tables):
            notices.append(
                f"team {name}: no acknowledgement template in its language {team.language!r}; "
                "customers who write without a language get the English one"
            )
    for sla in policy.policies:
        if sla.resolution is not None and sla.close_after_silence is None:
            notices.append(
                f"policy {sla.name}: has a resolution target but no close_after_silence; "
                "conversations waiting on a customer who never writes again stay open"
            )
    return notices
