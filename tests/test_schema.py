"""`replyclock schema`: the JSON Schema of replyclock.toml, as TOML editors use it.

The schema comes from the pydantic models in bot.config.shape (which also give the validator its
keys); examples/replyclock.schema.json is its committed copy, named by the example's first line.
"""

from __future__ import annotations

import json
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import TypeAdapter

from bot.cli import main
from bot.config.shape import PolicyFile, json_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "replyclock.toml"
SCHEMA_FILE = ROOT / "examples" / "replyclock.schema.json"


def as_json(value: Any) -> Any:
    """TOML data as an editor hands it to a JSON Schema: dates and times become ISO strings."""
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return value


def errors_of(text: str) -> list[str]:
    validator = Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(as_json(tomllib.loads(text)))
    ]


def test_the_command_prints_the_committed_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "examples/replyclock.schema.json is out of date: run "
        "`replyclock schema > examples/replyclock.schema.json`"
    )
    Draft202012Validator.check_schema(json.loads(printed))


def test_the_example_names_its_schema_for_editors() -> None:
    first = EXAMPLE.read_text(encoding="utf-8").splitlines()[0]
    assert first == "#:schema ./replyclock.schema.json"  # Taplo / Even Better TOML directive
    assert (EXAMPLE.parent / first.split()[-1]).resolve() == SCHEMA_FILE


def test_the_schema_accepts_the_example() -> None:
    assert errors_of(EXAMPLE.read_text(encoding="utf-8")) == []
    TypeAdapter(PolicyFile).validate_python(as_json(tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))))


EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ('slack_id = "U01ANNA0001"', 'slack_idd = "U01ANNA0001"', "experts.anna"),  # typo in a key
        ("capacity = 6 ", 'capacity = "six" ', "experts.ben.capacity"),  # wrong type
        (
            'hours = { mon-thu = ["08:00-14:00"] }',
            'hours = { funday = ["08:00-14:00"] }',
            "experts.ben.hours",
        ),
        ('first_response = "8h"', 'first_response = "8 hours"', "policies.1.first_response"),
        ('channel = "#billing"', 'channel = "billing"', "teams.billing.channel"),
        ('kind = "feed"', 'kind = "Feed"', "accounts.blog.kind"),
        ("[settings]", "[setting]", ""),  # unknown top-level table
        (
            'kind = "feed"',
            'kind = "feed"\nurll = "https://blog.example/feed"',
            "accounts.blog",
        ),  # a connector key
        ('user_id = "1234567890"', 'user_ids = "1234567890"', "accounts.x"),
    ],
)
def test_the_schema_rejects_a_broken_file(old: str, new: str, where: str) -> None:
    assert EXAMPLE_TEXT.count(old) >= 1, old
    errors = errors_of(EXAMPLE_TEXT.replace(old, new, 1))
    assert errors, f"{new!r} passed the schema"
    assert any(error.startswith(f"{where}:") for error in errors), errors


def test_the_schema_needs_teams_and_policies() -> None:
    errors = errors_of('[settings]\nconversation_gap = "24h"\n')
    assert any("'teams' is a required property" in error for error in errors), errors
    assert any("'policies' is a required property" in error for error in errors), errors


def test_the_schema_and_the_validator_know_the_same_keys() -> None:
    """Every key the schema offers, the validator takes: both read them from bot.config.shape."""
    from bot.config import validator

    definitions = json_schema()["$defs"]
    assert tuple(definitions["ExpertTable"]["properties"]) == validator._EXPERT_KEYS
    assert tuple(definitions["PolicyTable"]["properties"]) == validator._POLICY_KEYS
    assert tuple(json_schema()["properties"]) == validator._TOP_KEYS


def test_a_plug_in_kind_takes_any_keys() -> None:
    """Only the connectors the schema was made with restrict their accounts' keys."""
    text = EXAMPLE_TEXT.replace('kind = "feed"', 'kind = "forum"\nboard = "support"', 1)
    assert errors_of(text) == []
