"""The Slack app manifest: what a workspace admin pastes to create replyclock's app in one go.

``replyclock manifest`` prints it (JSON by default, YAML with ``--format yaml``); paste it at
https://api.slack.com/apps -> Create New App -> From a manifest.
"""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import urlsplit

from bot.slack.ids import COMMAND

EVENTS_PATH = "/slack/events"
# The Slack Web API methods replyclock calls (slack_sdk's method names) and the bot scopes each needs.
# tests/test_manifest.py scans bot/ for the calls and holds this table to them: a new call without an
# entry fails, and so does an entry nothing calls any more.
METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    "chat_postMessage": ("chat:write",),  # cards, thread notices, digests, DMs
    "chat_postEphemeral": ("chat:write",),  # answers only the clicking user sees
    "chat_update": ("chat:write",),  # the card follows the conversation
    "conversations_open": ("im:write",),  # the DM channel for nags and escalations
    # a card whose post was not recorded is looked up by its metadata before it is posted again
    "conversations_history": ("channels:history", "groups:history"),
    "conversations_replies": ("channels:history", "groups:history"),
    "users_info": ("users:read",),  # the time zone of a staff member
    "files_upload_v2": ("files:write",),  # the digest chart
    "views_open": (),  # the Reply modal (needs a trigger id, no scope)
    "views_publish": (),  # the App Home tab
}
# Scopes for features rather than methods: the slash command, and posting to a team channel the bot
# was never invited to (cards and digests go to `#channel` by name).
FEATURE_SCOPES = ("commands", "chat:write.public")
BOT_SCOPES = tuple(
    sorted({scope for scopes in METHOD_SCOPES.values() for scope in scopes} | set(FEATURE_SCOPES))
)
BOT_EVENTS = ("app_home_opened",)
DESCRIPTION = "Every customer post gets a human answer before its deadline."
COMMAND_HINT = "mine | queue [team] | stats [team] | away until YYYY-MM-DD | back | help"


def manifest(app_name: str, *, socket_mode: bool, request_url: str | None = None) -> dict[str, Any]:
    """The app manifest.

    Args:
        app_name: the app's and the bot user's name in Slack (35 characters at most for the app).
        socket_mode: True for `replyclock run` (Socket Mode, no public URL); False for
            `replyclock web` (HTTP, Slack calls `request_url`).
        request_url: the public base URL of `replyclock web` (``https://replyclock.example.com``;
            ``/slack/events`` is appended) or the full events URL; required without Socket Mode
            and left out with it.

    Returns:
        The manifest as a dict (Slack's manifest schema, ``_metadata.major_version`` 1).

    Raises:
        ValueError: HTTP mode without a ``https://`` request URL, or an empty or too long name.
    """
    name = app_name.strip()
    if not name or len(name) > 35:
        raise ValueError("the app name must be 1 to 35 characters")
    url = None if socket_mode else events_url(request_url or "")

    command: dict[str, Any] = {
        "command": COMMAND,
        "description": "Your queue, your team's queue and figures, away and back",
        "usage_hint": COMMAND_HINT,
        "should_escape": False,
    }
    events: dict[str, Any] = {"bot_events": list(BOT_EVENTS)}
    interactivity: dict[str, Any] = {"is_enabled": True}
    if url is not None:
        command["url"] = url
        events["request_url"] = url
        interactivity["request_url"] = url
    return {
        "_metadata": {"major_version": 1, "minor_version": 1},
        "display_information": {
            "name": name,
            "description": DESCRIPTION,
            "background_color": "#1d3557",
        },
        "features": {
            "app_home": {
                "home_tab_enabled": True,
                "messages_tab_enabled": False,
                "messages_tab_read_only_enabled": False,
            },
            "bot_user": {"display_name": name[:80], "always_online": True},
            "slash_commands": [command],
        },
        "oauth_config": {"scopes": {"bot": list(BOT_SCOPES)}},
        "settings": {
            "event_subscriptions": events,
            "interactivity": interactivity,
            "org_deploy_enabled": False,
            "socket_mode_enabled": socket_mode,
            "token_rotation_enabled": False,
        },
    }


def events_url(base: str) -> str:
    """The URL Slack sends events, clicks and slash commands to: `base` + ``/slack/events``.

    A full events URL is taken as it is; a base with a path (behind a proxy at ``/replyclock``)
    keeps it.

    Raises:
        ValueError: not an ``https://host`` URL, or one with a query or fragment.
    """
    parts = urlsplit(base.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(
            "HTTP mode needs the public https:// base URL of `replyclock web`"
            " (for example https://replyclock.example.com)"
        )
    if parts.query or parts.fragment:
        raise ValueError("the request URL takes no query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith(EVENTS_PATH):
        path = path[: -len(EVENTS_PATH)]
    return f"https://{parts.netloc}{path}{EVENTS_PATH}"


def render(document: dict[str, Any], fmt: Literal["json", "yaml"] = "json") -> str:
    """The manifest as JSON or YAML text (YAML written here: no PyYAML dependency for one command)."""
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    return "\n".join(_yaml(document, 0)) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    # JSON strings are valid YAML double-quoted scalars.
    return json.dumps(str(value))


def _yaml(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_yaml(item, indent + 1))
            else:
                lines.append(
                    f"{pad}{key}: {_scalar(item) if not isinstance(item, dict | list) else ('{}' if isinstance(item, dict) else '[]')}"
                )
        return lines
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                nested = _yaml(item, indent + 1)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [f"{pad}{_scalar(value)}"]
