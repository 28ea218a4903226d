"""`.env.example` lists every environment variable the code reads, and nothing it does not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bot.config.settings import CONNECTOR_SECRET_PREFIXES, variable_names

ROOT = Path(__file__).resolve().parent.parent
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]{2,}$")


def _is_environ(node: ast.expr) -> bool:
    """`os.environ`, `environ`, `env` and the like: what code reads variables from."""
    if isinstance(node, ast.Attribute):
        return node.attr in {"environ", "env"}
    return isinstance(node, ast.Name) and node.id in {"environ", "env", "source"}


def _literal(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and ENV_NAME.match(node.value):
        return node.value
    return None


def variables_read_by_the_code() -> dict[str, str]:
    """Names read as `environ.get("X")`, `environ["X"]`, `os.getenv("X")` or given as a connector's
    default variable (`DEFAULT_..._ENV = "X"`), with where."""
    found: dict[str, str] = {}
    for folder in ("bot", "connectors", "storage"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names: list[str | None] = []
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                    if node.func.attr == "get" and _is_environ(node.func.value):
                        names.append(_literal(node.args[0]))
                    if node.func.attr == "getenv":
                        names.append(_literal(node.args[0]))
                elif isinstance(node, ast.Subscript) and _is_environ(node.value):
                    names.append(_literal(node.slice))  # type: ignore[arg-type]
                elif isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and "ENV" in t.id for t in node.targets
                ):
                    names.extend(_literal(n) for n in ast.walk(node.value) if isinstance(n, ast.expr))
                for name in names:
                    if name:
                        found.setdefault(name, where)
    return found


def listed_in_env_example(*, commented: bool = True) -> set[str]:
    """Names set in .env.example; with `commented`, also those in `# NAME=...` example lines."""
    pattern = r"^#?\s*([A-Z][A-Z0-9_]+)=" if commented else r"^([A-Z][A-Z0-9_]+)="
    names = set()
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        match = re.match(pattern, line)
        if match:
            names.add(match.group(1))
    return names


def test_the_scan_finds_reads_of_each_kind() -> None:
    found = variables_read_by_the_code()
    assert "DATABASE_URL" in found  # os.environ.get in storage/db.py
    assert "X_CONSUMER_KEY" in found  # a connector's default variable
    assert "MASTODON_ACCESS_TOKEN" in found


def test_env_example_lists_every_variable_the_code_reads() -> None:
    scanned = set(variables_read_by_the_code())
    prefixes = {n for n in scanned if n.endswith("_")} | set(CONNECTOR_SECRET_PREFIXES)
    read = (scanned - prefixes) | set(variable_names())
    listed = listed_in_env_example()
    missing = sorted(read - listed) + sorted(
        f"{p}<NAME>" for p in prefixes if not any(n.startswith(p) for n in listed)
    )
    assert not missing, (
        f".env.example misses {missing} (read at {[variables_read_by_the_code().get(m) for m in missing]})"
    )
    # A commented `# NAME=` line may show a name the user chooses (e.g. a second password variable).
    unknown = sorted(
        n for n in listed_in_env_example(commented=False) - read if not n.startswith(tuple(prefixes))
    )
    assert not unknown, f".env.example lists variables nothing reads: {unknown}"


def test_every_settings_field_is_documented_with_a_valid_example_value() -> None:
    from bot.config.settings import load_settings

    values = {}
    for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if re.match(r"^[A-Z][A-Z0-9_]+=", line):
            name, _, value = line.partition("=")
            values[name] = value
    load_settings(values)  # the example as given is valid
