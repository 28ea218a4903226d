"""Build the connectors for the accounts of a policy, found through the entry-point group."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from bot import logs
from bot.core.policy import Policy
from connectors.base import Connector, connector_classes
from connectors.webhook import webhook_secret_problem


class ConnectorSetupError(Exception):
    """An account names an unknown connector kind, or its connector refused its settings."""


def build_connectors(
    policy: Policy, environ: Mapping[str, str], *, dry_run: bool = False
) -> dict[str, Connector]:
    """One connector per configured account.

    Args:
        policy: the validated policy.
        environ: where connectors read their secrets.
        dry_run: only check that every kind is known and no webhook secret that is set is too
            short (for `replyclock check`).
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
            weak = webhook_secret_problem(name, account.kind, account.settings, environ)
            if weak is not None:
                problems.append(f"accounts.{name}: {weak}")
            continue
        kwargs: dict[str, object] = {"own_ids": account.own_ids, "settings": account.settings}
        if "environ" in inspect.signature(cls.__init__).parameters:
            kwargs["environ"] = environ
        try:
            built[name] = cls(name, **kwargs)  # type: ignore[arg-type]
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
