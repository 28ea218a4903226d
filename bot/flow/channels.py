"""Build the connectors for the accounts of a policy, found through the entry-point group.

`validate_setup` is the one start-up validation: `replyclock check`, `run` and `web` all call it,
so they agree on every file.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from bot import logs
from bot.config import AccountCheck, KeyPath, load_policy
from bot.config.shape import AccountTable, keys_of
from bot.core.policy import Account, Policy
from connectors.base import Connector, connector_classes

COMMON_ACCOUNT_KEYS = keys_of(AccountTable)  # kind, own_ids, poll_interval, can_reply
# Long enough for connectors that refuse short secrets (a webhook's needs 32 bytes).
PLACEHOLDER_SECRET = "placeholder-secret-standing-in-for-the-real-one"


class ConnectorSetupError(Exception):
    """An account names an unknown connector kind, or its connector refused its settings."""


def build_connectors(
    policy: Policy, environ: Mapping[str, str], *, dry_run: bool = False
) -> dict[str, Connector]:
    """One connector per configured account.

    Args:
        policy: the validated policy.
        environ: where connectors read their secrets.
        dry_run: only check that every kind is known (`validate_setup` checks far more).
    """
    classes = connector_classes()
    built: dict[str, Connector] = {}
    problems = []
    if not dry_run:
        logs.add_secrets(named_secrets(policy, environ))
    for name, account in policy.accounts.items():
        cls = classes.get(account.kind)
        if cls is None:
            known = ", ".join(sorted(classes)) or "none installed"
            problems.append(f"accounts.{name}.kind: unknown connector kind {account.kind!r} (known: {known})")
            continue
        if dry_run:
            continue
        try:
            built[name] = _construct(cls, account, environ)
        except (KeyError, ValueError, TypeError) as error:
            problems.append(f"accounts.{name}: {error}")
    if problems:
        raise ConnectorSetupError("; ".join(problems))
    return built


def named_secrets(policy: Policy, environ: Mapping[str, str]) -> list[str]:
    """The values of the environment variables an account's settings name (``*_env`` keys, such
    as ``bearer_token_env`` or ``secret_env``): credentials, whatever the variables are called."""
    return [
        environ[value]
        for account in policy.accounts.values()
        for key, value in account.settings.items()
        if key.endswith("_env") and isinstance(value, str) and environ.get(value)
    ]


def _construct(cls: type[Connector], account: Account, environ: Mapping[str, str]) -> Connector:
    kwargs: dict[str, object] = {"own_ids": account.own_ids, "settings": account.settings}
    # Every built-in connector takes environ (connectors.base.ConnectorOptions); a plug-in's
    # constructor may not.
    parameters = inspect.signature(cls.__init__).parameters.values()
    if any(p.name == "environ" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        kwargs["environ"] = environ
    return cls(account.name, **kwargs)  # type: ignore[arg-type]


class _PlaceholderSecrets(Mapping[str, str]):
    """The environment with a stand-in for every unset variable: checks settings, not secrets."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def __getitem__(self, key: str) -> str:
        return self._environ.get(key) or PLACEHOLDER_SECRET

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


def account_check(
    environ: Mapping[str, str],
    *,
    secrets: bool = True,
    classes: Mapping[str, type[Connector]] | None = None,
) -> AccountCheck:
    """Check an account the way `build_connectors` will: a known kind, only keys its connector
    understands (each reported with its line and a "did you mean"), and then the connector's own
    checks of its settings and, when `secrets`, of the environment variables it needs."""
    found = connector_classes() if classes is None else classes
    placeholders = _PlaceholderSecrets(environ)

    def check(account: Account) -> list[tuple[KeyPath, str]]:
        cls = found.get(account.kind)
        if cls is None:
            known = ", ".join(sorted(found)) or "none installed"
            guess = difflib.get_close_matches(account.kind, list(found), n=1, cutoff=0.6)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            return [(("kind",), f"unknown connector kind {account.kind!r} ({hint}known: {known})")]
        problems: list[tuple[KeyPath, str]] = []
        typo_of: dict[str, str] = {}  # known key -> the unknown key that looks like it
        checked = account
        if cls.settings_keys is not None:
            allowed = (*COMMON_ACCOUNT_KEYS, *cls.settings_keys)
            for key in account.settings:
                if key in cls.settings_keys:
                    continue
                guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean '{guess[0]}'?" if guess else f"known: {', '.join(allowed)}"
                problems.append(((key,), f"unknown key {key!r} for a {account.kind} account ({hint})"))
                if guess and guess[0] in cls.settings_keys and guess[0] not in account.settings:
                    typo_of.setdefault(guess[0], key)
            # The connector checks the rest as if each typo were fixed ("url is required" would
            # only repeat "urll: did you mean 'url'?"), so its other mistakes show now too.
            settings = {key: value for key, value in account.settings.items() if key in cls.settings_keys}
            settings.update({known: account.settings[typo] for known, typo in typo_of.items()})
            checked = replace(account, settings=settings)
        # A connector stops at its first mistake: the settings are tried with every secret
        # present, then (unless skipped) with the real environment, so a missing secret is
        # reported beside a bad setting.
        messages = [_refusal(cls, checked, placeholders)]
        if secrets:
            messages.append(_refusal(cls, checked, environ))
        for message in dict.fromkeys(messages):
            if message:
                typo = next((typo for known, typo in typo_of.items() if _mentions(message, known)), None)
                problems.append(((typo,) if typo else _key_named(message, account), message))
        return problems

    return check


def _refusal(cls: type[Connector], account: Account, environ: Mapping[str, str]) -> str | None:
    """Why the connector refuses to be built for `account`, or None."""
    try:
        _construct(cls, account, environ)
    except (KeyError, ValueError, TypeError) as error:
        return str(error)
    return None


def _mentions(message: str, key: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", message) is not None


def _key_named(message: str, account: Account) -> KeyPath:
    """The account key a connector's message is about (for its line), else the account itself."""
    for key in account.settings:
        if _mentions(message, key):
            return (key,)
    return ()


def validate_setup(path: str | Path, environ: Mapping[str, str], *, secrets: bool = True) -> Policy:
    """Everything `run` and `web` validate before they start, in one pass: the policy file and
    each account's connector settings and (unless `secrets` is false) the secrets it needs.

    Raises:
        ConfigError: every problem found, each with file and line, in file order.
    """
    return load_policy(path, account_check=account_check(environ, secrets=secrets))
