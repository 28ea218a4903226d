"""bot.sim may be used by the flow (forecasts): it imports only bot.core, bot.config, storage and
itself (tests/test_layers.py holds the "sim" layer to that too; this says it for the package alone)."""

from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parent.parent / "bot" / "sim"
ALLOWED = ("bot.core", "bot.config", "bot.sim", "storage")


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.startswith(("bot", "storage", "connectors"))}


def test_the_simulator_imports_only_lower_layers() -> None:
    for path in sorted(SIM.glob("*.py")):
        wrong = {name for name in imported(path) if not name.startswith(ALLOWED)}
        assert not wrong, f"{path.name} imports {sorted(wrong)}"
