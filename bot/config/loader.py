"""Read, parse and validate a policy file: the public entry points."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from bot.config.locator import KeyLocator
from bot.config.problems import ConfigError, ConfigProblem
from bot.config.validator import AccountCheck, _Validator
from bot.core.policy import (
    Policy,
)

_TOML_POSITION_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda problem: (problem.line is None, problem.line or 0))


def parse_policy(
    data: Mapping[str, object],
    *,
    source: str,
    text: str | None = None,
    account_check: AccountCheck | None = None,
) -> Policy:
    """Validate already-parsed TOML data and build the `Policy`.

    Args:
        data: the document as `tomllib` returns it.
        source: the file name used in problems and kept as `Policy.source`.
        text: the TOML source, used only to find the line of each problem (None: no lines).
        account_check: also check each account with this (its connector's settings and
            secrets: see bot.flow.channels.validate_setup); its problems join the others.

    Raises:
        ConfigError: every problem found, in file order.
    """
    locator = KeyLocator(text) if text is not None else None
    validator = _Validator(source, locator, account_check)
    policy = validator.run(data)
    if policy is None:
        raise ConfigError(_sorted(validator.problems))
    return policy


def _syntax_problem(source: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(error)
    line: int | None = None
    match = _TOML_POSITION_RE.search(message)
    if match is not None:
        message = message[: match.start()]
        if match.group(1) is not None:
            line = int(match.group(1))
            message += f" at column {match.group(2)}"
        else:
            line = max(1, len(text.rstrip().splitlines()))
            message += " at the end of the file"
    message = message[:1].lower() + message[1:]
    return ConfigProblem(source, line, "", f"TOML syntax error: {message}")


def load_policy(path: str | Path, *, account_check: AccountCheck | None = None) -> Policy:
    """Read, parse and validate a policy file.

    Args:
        path: the TOML file; problems name it as given here.
        account_check: as for `parse_policy`.

    Returns:
        The validated policy.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML (one problem, with
            tomllib's line) or breaks the schema (every problem found, in file order).
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(
            [ConfigProblem(source, None, "", f"cannot read the file: {error.strerror or error}")]
        ) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigProblem(source, line, "", f"the file is not UTF-8 text (byte {error.start})")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_problem(source, text, error)]) from None
    except RecursionError:
        raise ConfigError(
            [ConfigProblem(source, None, "", "TOML syntax error: values nested too deeply")]
        ) from None
    return parse_policy(data, source=source, text=text, account_check=account_check)
