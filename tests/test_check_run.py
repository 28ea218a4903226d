"""`replyclock check` and `run`/`web` give the same verdict: they share one start-up validation.

Every file of tests/data/broken/ is fed to the real command line: `check` and `run` (and `web`
for one) must both refuse it with exit 2 and the very same problems, each naming file and line,
all of them in one pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main

ROOT = Path(__file__).resolve().parent.parent
BROKEN = ROOT / "tests" / "data" / "broken"
EXAMPLE = ROOT / "examples" / "replyclock.toml"
SECRET_VARIABLES = re.compile(r"^(X_|MASTODON_|WEBHOOK_SECRET_|SLACK_)")
PROBLEM = re.compile(r"^error: (?P<file>[^:]+\.toml):(?P<line>\d+): ")

# How many problems each file holds: all must come in one pass.
EXPECTED_PROBLEMS = {
    "account_key_typo.toml": 1,
    "connector_setting_missing.toml": 1,
    "connector_setting_out_of_range.toml": 2,  # max_results, and the X secrets
    "everything_at_once.toml": 4,
    "missing_secrets.toml": 3,
    "policy_problem.toml": 1,
    "toml_syntax.toml": 1,
    "typo_and_bad_value.toml": 2,  # urll, and the timeout the feed connector refuses
    "unknown_kind.toml": 2,
}


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not SECRET_VARIABLES.match(key)}
    env.pop("REPLYCLOCK_CONFIG", None)
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'replyclock.db'}",
        PORT="0",
        HOST="127.0.0.1",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )
    return env


def _start(command: str, path: Path, tmp_path: Path, *options: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", command, "--config", str(path), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_environment(tmp_path, **extra),
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    try:
        _, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # it started instead of refusing: a failure, not a hang
        process.kill()
        process.communicate()
        raise AssertionError(f"{process.args} started instead of refusing its policy file") from None
    return process.returncode, [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_the_corpus_is_complete() -> None:
    assert sorted(path.name for path in BROKEN.glob("*.toml")) == sorted(EXPECTED_PROBLEMS)


def _check_in_process(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    """`replyclock check` through `bot.cli.main`, in this process (cheaper than a subprocess)."""
    for name in list(os.environ):
        if SECRET_VARIABLES.match(name):
            monkeypatch.delenv(name)
    monkeypatch.delenv("REPLYCLOCK_CONFIG", raising=False)
    capsys.readouterr()
    try:
        code = main(["check", "--config", str(path)])
    except SystemExit as exit:
        code = int(exit.code or 0)
    stderr = capsys.readouterr().err
    return code, [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_check_and_run_agree_on_every_broken_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = sorted(BROKEN.glob("*.toml"))
    running = [(path, _start("run", path, tmp_path)) for path in files]
    web = _start("web", BROKEN / "everything_at_once.toml", tmp_path)
    for path, run in running:
        check_code, check_errors = _check_in_process(path, monkeypatch, capsys)
        run_code, run_errors = _finish(run)
        assert check_code == 2, (path.name, check_errors)
        assert run_code == 2, (path.name, run_errors)
        assert run_errors == check_errors, path.name
        assert len(check_errors) == EXPECTED_PROBLEMS[path.name], (path.name, check_errors)
        for line in check_errors:
            match = PROBLEM.match(line)
            assert match is not None, line  # every problem names its file and line
            assert Path(match["file"]).name == path.name
    web_code, web_errors = _finish(web)
    assert web_code == 2
    assert web_errors == _check_in_process(BROKEN / "everything_at_once.toml", monkeypatch, capsys)[1]


def test_everything_at_once_names_each_mistake_with_its_line(tmp_path: Path) -> None:
    path = BROKEN / "everything_at_once.toml"
    text = path.read_text(encoding="utf-8").splitlines()
    code, errors = _finish(_start("check", path, tmp_path))
    assert code == 2
    found = {int(PROBLEM.match(line)["line"]): line for line in errors}  # type: ignore[index]
    assert text[_line(found, "conversation_gap") - 1].startswith("conversation_gap")
    assert text[_line(found, "'discourse'") - 1] == 'kind = "discourse"'
    assert text[_line(found, "did you mean 'staff_authors'?") - 1].startswith("staff_author =")
    assert "WEBHOOK_SECRET_SHOP" in found[_line(found, "WEBHOOK_SECRET_SHOP")]


def _line(found: dict[int, str], fragment: str) -> int:
    hits = [line for line, text in found.items() if fragment in text]
    assert len(hits) == 1, (fragment, found)
    return hits[0]


def test_no_secrets_skips_only_the_secrets(tmp_path: Path) -> None:
    secrets_only = BROKEN / "missing_secrets.toml"
    both = BROKEN / "connector_setting_out_of_range.toml"
    assert _finish(_start("check", secrets_only, tmp_path, "--no-secrets"))[0] == 0
    code, errors = _finish(_start("check", both, tmp_path, "--no-secrets"))
    assert code == 2
    assert len(errors) == 1 and "max_results" in errors[0]


@pytest.mark.parametrize("with_secrets", [True, False])
def test_the_example_passes_with_its_secrets_or_without_checking_them(
    tmp_path: Path, with_secrets: bool
) -> None:
    secrets = {
        name: "set-in-the-environment-0123456789"  # 32 bytes at least: a webhook secret
        for name in (
            "X_CONSUMER_KEY",
            "X_CONSUMER_SECRET",
            "X_ACCESS_TOKEN",
            "X_ACCESS_TOKEN_SECRET",
            "MASTODON_ACCESS_TOKEN",
            "WEBHOOK_SECRET_SHOP",
        )
    }
    options = () if with_secrets else ("--no-secrets",)
    process = _start("check", EXAMPLE, tmp_path, *options, **(secrets if with_secrets else {}))
    code, errors = _finish(process)
    assert (code, errors) == (0, [])
    if with_secrets:  # and without them, the same file is refused
        code, errors = _finish(_start("check", EXAMPLE, tmp_path))
        assert code == 2 and any("MASTODON_ACCESS_TOKEN" in line for line in errors)
