"""The layers of bot/ keep their direction: a module never imports a layer above it.

The checker reads every module's imports with `ast` (top-level and function-level ones, absolute
and relative), maps each module to its layer and reports every import a layer may not make:

    core     imports nothing of flow, reports, slack, web, jobs, cli, demo, config
    config   imports nothing of flow, reports, slack, web, jobs, cli, demo, sim (only core)
    sim      imports nothing of flow, reports, slack, web, jobs, cli, demo (core, config, storage)
    flow     imports nothing of reports, slack, web, jobs, cli, demo
    reports  imports nothing of slack, web, jobs, cli, demo
    slack    imports nothing of web, jobs, cli, demo
    util     (logs, runlock, telemetry, http) imports no layer at all
    demo     is imported by nobody but bot/cli.py (and tests)

`connectors/` and `storage/` sit below bot/ and import none of it but `bot.core` and the
utilities. No two modules import each other, directly or round a longer circle, not even from
inside a function (the Slack feature modules share helpers through bot/slack/common.py, and
bot/slack/app.py imports them, not the other way round). The
synthetic-tree tests show that both checkers do fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UTILITIES = frozenset({"bot.logs", "bot.runlock", "bot.telemetry", "bot.httputil"})
ALL_UPPER = ("flow", "reports", "slack", "web", "jobs", "cli", "demo", "config", "sim")
FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset(ALL_UPPER),
    "config": frozenset({"flow", "reports", "slack", "web", "jobs", "cli", "demo", "sim"}),
    # The simulator and forecasts: core, config and storage only (flow uses it for forecasts).
    "sim": frozenset({"flow", "reports", "slack", "web", "jobs", "cli", "demo"}),
    "flow": frozenset({"reports", "slack", "web", "jobs", "cli", "demo"}),
    "reports": frozenset({"slack", "web", "jobs", "cli", "demo"}),
    "slack": frozenset({"web", "jobs", "cli", "demo"}),
    "util": frozenset({"core", *ALL_UPPER}),
    # Below bot/ altogether: the pure core and the utilities only.
    "connectors": frozenset(ALL_UPPER),
    "storage": frozenset(ALL_UPPER),
}
DEMO_IMPORTERS = frozenset({"bot.cli"})


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a module name, or None for modules outside the rules (tests, bench...)."""
    if module in UTILITIES:
        return "util"
    parts = module.split(".")
    if parts[0] in ("connectors", "storage"):
        return parts[0]
    if parts[0] != "bot" or len(parts) < 2:
        return None
    return parts[1]


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import in the tree, relative ones resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from bot import demo` imports the submodule bot.demo.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def layer_violations(root: Path) -> list[str]:
    """Every forbidden import under `root` (which holds bot/, connectors/, storage/)."""
    problems: list[str] = []
    for top in ("bot", "connectors", "storage"):
        for path in sorted((root / top).rglob("*.py")):
            module = module_name(root, path)
            layer = layer_of(module)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, target in imported_modules(tree, module, path.name == "__init__.py"):
                target_layer = layer_of(target)
                if target_layer is None or target_layer == layer:
                    continue
                where = f"{path.relative_to(root)}:{line}"
                if layer is not None and target_layer in FORBIDDEN.get(layer, frozenset()):
                    problems.append(f"{where}: {layer} module {module} imports {target} ({target_layer})")
                elif target_layer == "demo" and module not in DEMO_IMPORTERS:
                    problems.append(f"{where}: {module} imports the demo ({target}); only bot.cli may")
    return sorted(set(problems))


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too, but not those under ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        return [node]
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return [found for child in node.orelse for found in _import_nodes(child)]
    return [found for child in ast.iter_child_nodes(node) for found in _import_nodes(child)]


def import_cycles(root: Path) -> list[list[str]]:
    """Circles of imports among our modules: a function-level import that dodges a circle at
    import time still ties the two modules together, so it counts (``TYPE_CHECKING`` ones do not)."""
    paths = {
        module_name(root, path): path
        for top in ("bot", "connectors", "storage")
        for path in sorted((root / top).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges: set[str] = set()
        for node in _import_nodes(tree):
            found = imported_modules(
                ast.Module(body=[node], type_ignores=[]), module, path.name == "__init__.py"
            )
            names = {target for _, target in found}
            for target in names:
                # `from package import submodule` depends on the submodule, not the package.
                if (
                    target in paths
                    and target != module
                    and not any(other.startswith(target + ".") and other in paths for other in names)
                ) or (target in paths and target != module and isinstance(node, ast.Import)):
                    edges.add(target)
        graph[module] = edges
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles() -> None:
    assert import_cycles(ROOT) == []


def test_a_cycle_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/slack/app.py": "def register_handlers():\n    from bot.slack import actions\n",
            "bot/slack/actions.py": "from bot.slack.app import session_of\n",
            "bot/slack/common.py": "",
        },
    )
    assert import_cycles(root) == [["bot.slack.actions", "bot.slack.app", "bot.slack.actions"]]


def test_the_layers_hold() -> None:
    assert layer_violations(ROOT) == []


def test_every_bot_module_has_a_layer() -> None:
    """A new top-level module must be placed in a layer (or named a utility) on purpose."""
    known = {"core", "flow", "reports", "slack", "web", "jobs", "cli", "demo", "config", "util", "sim"}
    for path in (ROOT / "bot").rglob("*.py"):
        module = module_name(ROOT, path)
        if module == "bot":
            continue
        assert layer_of(module) in known, module


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name in ("bot", "connectors", "storage"):
        (root / name).mkdir(exist_ok=True)
        (root / name / "__init__.py").touch()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != root / "bot":
            (path.parent / "__init__.py").touch()
        path.write_text(text, encoding="utf-8")
    return root


def test_a_core_module_importing_flow_fails(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/core/sla.py": "from bot.flow.ingest import ingest_batch\n",
            "bot/flow/ingest.py": "from bot.core.sla import due_at\n",
        },
    )
    assert layer_violations(root) == [
        "bot/core/sla.py:1: core module bot.core.sla imports bot.flow.ingest (flow)",
        "bot/core/sla.py:1: core module bot.core.sla imports bot.flow.ingest.ingest_batch (flow)",
    ]


def test_relative_and_function_level_imports_count(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/core/ladder.py": "def f():\n    from ..flow import sweep\n",
            "bot/flow/sweep.py": "import bot.reports.metrics\n",
            "bot/reports/metrics.py": "",
            "bot/jobs.py": "from bot import demo\n",
            "bot/demo/__init__.py": "",
            "bot/cli.py": "from bot.demo import story\n",
            "bot/demo/story.py": "",
        },
    )
    found = layer_violations(root)
    assert "bot/core/ladder.py:2: core module bot.core.ladder imports bot.flow (flow)" in found
    assert "bot/flow/sweep.py:1: flow module bot.flow.sweep imports bot.reports.metrics (reports)" in found
    assert "bot/jobs.py:1: bot.jobs imports the demo (bot.demo); only bot.cli may" in found
    assert not any(line.startswith("bot/cli.py") for line in found)
