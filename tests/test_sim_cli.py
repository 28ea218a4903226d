"""`replyclock simulate` run as a user runs it (a real process) on a generated history and on the
demo's data; actual figures checked against the digest's; repeatable with a seed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.config import load_policy
from bot.demo.story import DEMO_POLICY
from bot.flow.context import AppContext
from bot.reports.digest import WeekRange, build_digest
from bot.sim.engine import Simulator
from bot.sim.synth import (
    realistic_arrivals,
    realistic_policy,
    realistic_policy_text,
    true_times,
    write_history,
)
from storage.db import make_engine, make_sessionmaker
from storage.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent


def simulate(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{database}"},
    )


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Twelve weeks (September to November 2025) of a generated helpdesk, in an SQLite file."""
    folder = tmp_path_factory.mktemp("year")
    policy_file = folder / "year.toml"
    policy_file.write_text(realistic_policy_text(1))
    policy = realistic_policy(1)
    start, end = datetime(2025, 9, 1, tzinfo=UTC), datetime(2025, 11, 24, tzinfo=UTC)
    arrivals = [a for a in realistic_arrivals(year=2025, per_year=12_000, seed=9) if start <= a.at < end]
    conversations = Simulator(policy, true_times(1), start=start, end=end).run(arrivals, seed=9).conversations
    database = folder / "year.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    with make_sessionmaker(engine)() as session:
        write_history(session, policy, arrivals, conversations)
        session.commit()
    engine.dispose()
    return database, policy_file


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_simulate_the_generated_history_writes_csv_and_png_and_repeats_with_a_seed(
    history: tuple[Path, Path], tmp_path: Path
) -> None:
    database, policy_file = history
    common = ["--current", str(policy_file), "--from", "2025-10-06", "--to", "2025-11-02", "--seed", "4"]
    first = simulate(database, *common, "--csv", str(tmp_path / "a.csv"), "--png", str(tmp_path / "a.png"))
    assert first.returncode == 0, first.stderr
    assert "care" in first.stdout and "simulated" in first.stdout
    second = simulate(database, *common, "--csv", str(tmp_path / "b.csv"))
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = simulate(database, *common[:-1], "5", "--csv", str(tmp_path / "c.csv"))
    assert other.returncode == 0, other.stderr
    table = rows(tmp_path / "a.csv")
    assert (tmp_path / "c.csv").read_text() != (tmp_path / "a.csv").read_text()
    assert {row["team"] for row in table} == {"care", "billing"}
    assert {row["week"] for row in table if row["team"] == "care"} == {
        "2025-W41",
        "2025-W42",
        "2025-W43",
        "2025-W44",
    }

    # The actual rows are the digest's own figures.
    policy = load_policy(policy_file)
    engine = make_engine(f"sqlite:///{database}")
    try:
        ctx = AppContext(policy=policy, engine=engine)
        with ctx.read_sessions() as session:
            digest = build_digest(session, ctx, "care", WeekRange.parse("2025-W42", "Europe/London"))
    finally:
        engine.dispose()
    (actual,) = [
        r for r in table if r["team"] == "care" and r["week"] == "2025-W42" and r["source"] == "actual"
    ]
    assert actual["share_within_target"] == f"{digest.current.share_within_sla:.4f}"
    assert int(actual["breaches"]) == len(digest.current.breaches)
    assert int(actual["judged"]) == digest.current.judged
    # Simulated and actual are close on the history the model was fitted on.
    (simulated,) = [
        r for r in table if r["team"] == "care" and r["week"] == "2025-W42" and r["source"] == "simulated"
    ]
    assert abs(float(simulated["share_within_target"]) - float(actual["share_within_target"])) < 0.15


def test_more_arrivals_hurt_and_an_extra_expert_helps(history: tuple[Path, Path], tmp_path: Path) -> None:
    database, policy_file = history
    common = ["--current", str(policy_file), "--from", "2025-10-06", "--to", "2025-11-02", "--team", "care"]

    def simulated_breaches(*extra: str) -> int:
        out = tmp_path / f"{len(extra)}-{abs(hash(extra))}.csv"
        result = simulate(database, *common, *extra, "--csv", str(out))
        assert result.returncode == 0, result.stderr
        return sum(int(r["breaches"]) for r in rows(out) if r["source"] == "simulated")

    baseline = simulated_breaches()
    assert simulated_breaches("--arrivals", "1.6") > baseline
    assert simulated_breaches("--add-expert", "care:mon-fri 08:00-20:00") < baseline
    assert simulated_breaches("--remove-expert", "alma") > baseline
    bad = simulate(database, *common, "--add-expert", "care:someday 9-5")
    assert bad.returncode == 2 and "not working hours" in bad.stderr


def test_goal_search_prints_a_schedule_that_reaches_it(history: tuple[Path, Path]) -> None:
    database, policy_file = history
    result = simulate(
        database,
        "--current",
        str(policy_file),
        "--from",
        "2025-10-20",
        "--to",
        "2025-11-02",
        "--team",
        "billing",
        "--goal",
        "90%",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reached with" in result.stdout
    assert "mon  09:00-13:00 x" in result.stdout
    share = float(result.stdout.split("simulated: ")[1].split("%")[0])
    assert share >= 90.0


def test_simulate_runs_on_the_demo_data_kept_from_the_command_line(tmp_path: Path) -> None:
    """`replyclock demo --keep` stores the story and eight weeks of history before it; `replyclock
    simulate` replays those weeks from the command line, the same seed giving the same bytes."""
    demo = subprocess.run(
        [sys.executable, "-m", "bot.cli", "demo", "--keep", "demo.db"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "kept: the database in demo.db" in demo.stdout
    assert (tmp_path / "demo.toml").read_text() == DEMO_POLICY
    # The story's own three conversations are there, with the weeks before it.
    assert "figures: 3 conversations, 3 answered" in demo.stdout
    stored = int(demo.stdout.split("history: ")[1].split(" conversations")[0])
    assert stored > 800
    again = subprocess.run(
        [sys.executable, "-m", "bot.cli", "demo", "--keep", "demo.db"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert again.returncode == 2 and "exists" in again.stderr

    database = tmp_path / "demo.db"
    common = ["--current", str(tmp_path / "demo.toml"), "--from", "2026-09-28", "--to", "2026-11-21"]
    first = simulate(
        database, *common, "--seed", "7", "--csv", str(tmp_path / "a.csv"), "--png", str(tmp_path / "a.png")
    )
    assert first.returncode == 0, first.stdout + first.stderr
    second = simulate(database, *common, "--seed", "7", "--csv", str(tmp_path / "b.csv"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.png").stat().st_size > 1000
    other = simulate(database, *common, "--seed", "8", "--csv", str(tmp_path / "c.csv"))
    assert other.returncode == 0 and (tmp_path / "c.csv").read_bytes() != (tmp_path / "a.csv").read_bytes()
    # Enough history to mean something: eight weeks per team, dozens judged a week, and the
    # simulated share within target close to the actual one on average.
    table = rows(tmp_path / "a.csv")
    for team in ("care", "billing"):
        actual = {r["week"]: r for r in table if r["team"] == team and r["source"] == "actual"}
        simulated = {r["week"]: r for r in table if r["team"] == team and r["source"] == "simulated"}
        weeks = [w for w in actual if int(actual[w]["judged"]) >= 20 and simulated[w]["share_within_target"]]
        assert len(weeks) == 8, (team, sorted(actual))
        gaps = [
            abs(float(actual[w]["share_within_target"]) - float(simulated[w]["share_within_target"]))
            for w in weeks
        ]
        assert sum(gaps) / len(gaps) < 0.10, (team, gaps)
