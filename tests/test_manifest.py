"""The Slack app manifest: the request URL Slack calls, and exactly the scopes the code's calls need."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from slack_sdk import WebClient

from bot.slack.manifest import BOT_SCOPES, FEATURE_SCOPES, METHOD_SCOPES, events_url, manifest

ROOT = Path(__file__).resolve().parent.parent
WEB_API_METHODS = {
    name
    for name, member in inspect.getmembers(WebClient, inspect.isfunction)
    if not name.startswith("_") and name not in {"api_call"}
}


def slack_methods_called() -> dict[str, list[str]]:
    """Every `<something>.<Web API method>(...)` in bot/ (the demo's stand-in aside), with where."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "bot").rglob("*.py")):
        if "demo" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in WEB_API_METHODS:
                    found.setdefault(func.attr, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(func, ast.Attribute) and func.attr == "api_call" and node.args:
                    first = node.args[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, str):
                        name = first.value.replace(".", "_")
                        found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_scan_sees_the_calls_it_must() -> None:
    called = slack_methods_called()
    # a sanity check of the scanner itself: these calls are certainly in the code
    assert "chat_postMessage" in called and "conversations_open" in called and "views_publish" in called


def test_every_web_api_call_has_its_scopes_in_the_table_and_nothing_else_is_there() -> None:
    called = slack_methods_called()
    missing = sorted(set(called) - set(METHOD_SCOPES))
    assert not missing, f"Web API calls with no entry in METHOD_SCOPES: {[(m, called[m]) for m in missing]}"
    stale = sorted(set(METHOD_SCOPES) - set(called))
    assert not stale, f"METHOD_SCOPES lists methods nothing calls: {stale}"


def test_bot_scopes_are_exactly_what_the_calls_and_features_need() -> None:
    needed = {scope for method in slack_methods_called() for scope in METHOD_SCOPES[method]}
    assert set(BOT_SCOPES) == needed | set(FEATURE_SCOPES)
    assert "channels:read" not in BOT_SCOPES and "groups:read" not in BOT_SCOPES
    assert manifest("replyclock", socket_mode=True)["oauth_config"]["scopes"]["bot"] == list(BOT_SCOPES)


@pytest.mark.parametrize(
    "given",
    [
        "https://x.example",
        "https://x.example/",
        "https://x.example/slack/events",
        "https://x.example/slack/events/",
    ],
)
def test_request_url_is_the_base_url_with_slack_events_appended(given: str) -> None:
    document = manifest("replyclock", socket_mode=False, request_url=given)
    expected = "https://x.example/slack/events"
    assert document["settings"]["event_subscriptions"]["request_url"] == expected
    assert document["settings"]["interactivity"]["request_url"] == expected
    assert document["features"]["slash_commands"][0]["url"] == expected


def test_a_base_behind_a_proxy_path_keeps_it() -> None:
    assert events_url("https://x.example:8443/replyclock") == "https://x.example:8443/replyclock/slack/events"


@pytest.mark.parametrize("bad", ["", "http://x.example", "x.example", "https://", "https://x.example/?a=1"])
def test_request_url_must_be_https_with_a_host(bad: str) -> None:
    with pytest.raises(ValueError):
        events_url(bad)
