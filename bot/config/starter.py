"""`replyclock init`: a starter policy file and .env that pass `replyclock check` as written.

The answers come from flags, else from questions on a terminal, else from defaults. The policy file
is one team with one placeholder expert, one business calendar, the classic 24 h / 48 h policy and
the accounts chosen; the .env file holds the database URL, the Slack variables (empty) and the
secrets the accounts need (a webhook secret is generated; the others are left for the user to fill).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CONNECTORS = ("webhook", "mastodon", "feed", "x")
TEAM_ID = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
CHANNEL = re.compile(r"^#[a-z0-9][a-z0-9_-]{0,79}$")


class StarterError(ValueError):
    """A bad answer, or a file that exists (without --force)."""


def _ask(prompt: str, default: str, reader: Callable[[str], str]) -> str:
    answer = reader(f"{prompt} [{default}]: ").strip()
    return answer or default


def _check_team(team: str) -> str:
    if not TEAM_ID.match(team):
        raise StarterError(f"team {team!r}: use lower-case letters, digits, - and _ (e.g. support)")
    return team


def _check_channel(channel: str) -> str:
    channel = channel if channel.startswith("#") else f"#{channel}"
    if not CHANNEL.match(channel):
        raise StarterError(f"channel {channel!r}: a Slack channel name such as #support")
    return channel


def _check_timezone(zone: str) -> str:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise StarterError(f"time zone {zone!r}: an IANA name such as Europe/Berlin or UTC") from None
    return zone


def write_starter(
    *,
    config: Path,
    env_file: Path,
    team: str | None = None,
    channel: str | None = None,
    timezone: str | None = None,
    connectors: Sequence[str] | None = None,
    force: bool = False,
    interactive: bool = False,
    reader: Callable[[str], str] = input,
) -> list[Path]:
    """Write the starter files; returns the paths written.

    Raises:
        StarterError: an invalid answer, or a file that exists without `force`.
    """
    for path in (config, env_file):
        if path.exists() and not force:
            raise StarterError(f"{path} exists (pass --force to overwrite it)")
    if interactive:
        team = team or _ask("Team id", "support", reader)
        channel = channel or _ask("Its Slack channel", f"#{team}", reader)
        timezone = timezone or _ask("Its time zone", "UTC", reader)
        if not connectors:
            chosen = _ask(f"Accounts to read ({', '.join(CONNECTORS)}; comma-separated)", "webhook", reader)
            connectors = [c.strip() for c in chosen.split(",") if c.strip()]
    team = _check_team(team or "support")
    channel = _check_channel(channel or f"#{team}")
    timezone = _check_timezone(timezone or "UTC")
    kinds = list(dict.fromkeys(connectors or ["webhook"]))
    for kind in kinds:
        if kind not in CONNECTORS:
            raise StarterError(f"connector {kind!r}: one of {', '.join(CONNECTORS)}")
    config.parent.mkdir(parents=True, exist_ok=True)
    env_file.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(policy_text(team, channel, timezone, kinds), encoding="utf-8")
    env_file.write_text(env_text(config, kinds), encoding="utf-8")
    env_file.chmod(0o600)  # it holds secrets
    return [config, env_file]


def policy_text(team: str, channel: str, timezone: str, kinds: Sequence[str]) -> str:
    """The starter policy file."""
    accounts = "\n".join(ACCOUNTS[kind] for kind in kinds)
    return f"""# replyclock.toml, written by `replyclock init`. Check it with `replyclock check`;
# examples/replyclock.toml in the source shows every option. Secrets live in .env, never here.

[settings]
conversation_gap = "24h"
default_team = "{team}"

[calendars.office]
timezone = "{timezone}"
hours = {{ mon-fri = ["09:00-17:00"] }}

# The people who answer. slack_id: Slack profile > (three dots) > Copy member ID.
[experts.first]
name = "First Expert"
slack_id = "U00000000"
timezone = "{timezone}"
hours = {{ mon-fri = ["09:00-17:00"] }}

[teams.{team}]
display_name = "{team.replace("-", " ").replace("_", " ").title()}"
channel = "{channel}"
calendar = "office"
experts = ["first"]
on_call = "first"
manager = "first"

# An answer within 24 hours on working days, 48 hours for posts on a weekend or holiday.
[[policies]]
name = "standard"
clock = "wall"
calendar = "office"
first_response = "24h"
weekend_first_response = "48h"
next_response = "24h"
warn_at = [0.75]
nag_every = "2h"
acknowledge = true
escalation = [
    {{ after = "0s", notify = "team_channel" }},
    {{ after = "4h", notify = "manager" }},
]

[acknowledgements.default]
en = "Thanks {{author}}! {{owner_first_name}} from our {{team}} team will answer within {{due_in}}."

{accounts}"""


ACCOUNTS = {
    "webhook": """# Your contact form or chat widget POSTs signed JSON to /hooks/site (see the README).
[accounts.site]
kind = "webhook"
secret_env = "WEBHOOK_SECRET_SITE"
can_reply = false
""",
    "mastodon": """# Mentions of your Mastodon account; the token is MASTODON_ACCESS_TOKEN in .env.
[accounts.mastodon]
kind = "mastodon"
api_base_url = "https://mastodon.social"
own_ids = ["@yourname@mastodon.social"]
poll_interval = "2m"
""",
    "feed": """# Comments on your blog, from its RSS or Atom comment feed.
[accounts.blog]
kind = "feed"
url = "https://blog.example.com/comments/feed/"
poll_interval = "10m"
can_reply = false
""",
    "x": """# Mentions of your X account; the keys are X_* in .env.
[accounts.x]
kind = "x"
user_id = "0"
own_ids = ["@yourname"]
poll_interval = "60s"
""",
}


def env_text(config: Path, kinds: Sequence[str]) -> str:
    """The starter .env: settings and the secrets the chosen accounts need."""
    lines = [
        "# .env, written by `replyclock init`. replyclock reads it from the current directory",
        "# (or --env-file PATH); variables set in the real environment win. Keep it out of git.",
        "DATABASE_URL=sqlite:///replyclock.db",
        f"REPLYCLOCK_CONFIG={config}",
        "",
        "# Slack (empty: staff messages are logged instead). `replyclock manifest` creates the app.",
        "SLACK_BOT_TOKEN=",
        "SLACK_APP_TOKEN=",
        "SLACK_SIGNING_SECRET=",
    ]
    if "webhook" in kinds:
        lines += [
            "",
            "# The HMAC secret your site signs webhook bodies with.",
            f"WEBHOOK_SECRET_SITE={secrets.token_hex(32)}",
        ]
    if "mastodon" in kinds:
        lines += [
            "",
            "# Mastodon: Preferences > Development > New application (read, write).",
            "MASTODON_ACCESS_TOKEN=",
        ]
    if "x" in kinds:
        lines += [
            "",
            "# X API v2 keys of your app (developer.x.com).",
            "X_BEARER_TOKEN=",
            "X_CONSUMER_KEY=",
            "X_CONSUMER_SECRET=",
            "X_ACCESS_TOKEN=",
            "X_ACCESS_TOKEN_SECRET=",
        ]
    return "\n".join(lines) + "\n"
