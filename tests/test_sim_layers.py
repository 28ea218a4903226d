"""bot.sim may be used by the flow (forecasts): it imports only bot.core, bot.config, storage and
itself, except the modules that measure with the digest (report, backtest) and the command (cli)."""

from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parent.parent / "bot" / "sim"
MEASURING = {"report.py", "backtest.py", "cli.py"}
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
        if path.name in MEASURING:
            continue
        wrong = {name for name in imported(path) if not name.startswith(ALLOWED)}
        assert not wrong, f"{path.name} imports {sorted(wrong)}"


def test_the_measuring_modules_never_reach_slack_web_or_demo() -> None:
    for name in MEASURING:
        wrong = {
            m for m in imported(SIM / name) if m.startswith(("bot.slack", "bot.web", "bot.demo", "bot.jobs"))
        }
        assert not wrong, f"{name} imports {sorted(wrong)}"
