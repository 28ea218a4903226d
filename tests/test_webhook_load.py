"""The webhook endpoint under concurrent load, over real loopback sockets.

A bounded run of bench/webhook_load.py: a real `replyclock web` process on SQLite and on
PostgreSQL, 300 distinct signed deliveries plus 30 re-deliveries at concurrency 16, with the
bench's own checks (only 202s, every accepted id stored exactly once in the conversation its
answer named, every re-delivery answered ``"duplicate": true``, the server's counters agree, no
warning logged). Nothing here is timed: the rate is the bench's business. On PostgreSQL also two
web processes given the very same deliveries at once (their batches overlap in every post).

Then the SQLite write turn of bot.web: transactions of deliveries (batches of those waiting
together) on SQLite take turns in the web process (first come, first served) instead of waiting
in SQLite's busy handler; on PostgreSQL they run side by side; a delivery that does not get its
turn in time is answered 503.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import bot.web
from bench.webhook_load import (
    ACCOUNT,
    SECRET,
    WEBHOOK_ACCOUNT,
    Run,
    WebProcess,
    build_plan,
    check_run,
    drive,
    migrated,
    scrape_counters,
    stored_state,
)
from bot.config import parse_policy
from bot.flow.context import AppContext
from bot.web import create_app, serve_in_thread
from connectors.webhook import SIGNATURE_HEADER, WebhookConnector, sign
from storage.db import make_engine
from storage.migrate import upgrade
from storage.models import Post
from tests.conftest import POLICY_TOML

pytestmark = pytest.mark.slow

POSTS = 300
CONCURRENCY = 16


def test_concurrent_deliveries_are_all_accepted_and_stored_once(database_url: str, tmp_path: Path) -> None:
    migrated(database_url)
    plan = build_plan(POSTS, 0.10, tag="ci", now=datetime.now(UTC))
    assert len(plan) == POSTS + POSTS // 10 and len({d.external_id for d in plan}) == POSTS
    server = WebProcess(database_url, tmp_path)
    try:
        result = drive("raw", server.base_url, f"/hooks/{ACCOUNT}", plan, CONCURRENCY, time_cap=60)
        counters = scrape_counters(server.base_url)
    finally:
        code = server.stop()
    run = Run("db", CONCURRENCY, "raw", plan, result, server_cpu=None, machine_busy=None)
    check_run(run, stored_state(database_url), counters, server.log_problems())
    assert run.failures == [], "\n".join([*run.failures, server.log_tail()])
    assert len(run.outcomes) == len(plan)
    assert run.statuses() == {"202": len(plan)}
    assert code in (0, -signal.SIGTERM)


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_two_web_processes_batching_the_same_deliveries_store_each_once(
    database_url: str, tmp_path: Path
) -> None:
    """Every delivery sent to both of two web processes at once: their batches overlap in every
    post, and still each post is stored once, one answer per post says ``"duplicate": false``,
    and every answer names the conversation the post is in."""
    migrated(database_url)
    plan = build_plan(POSTS, 0.0, tag="two", now=datetime.now(UTC))
    directories = [tmp_path / "one", tmp_path / "two"]
    for directory in directories:
        directory.mkdir()
    servers: list[WebProcess] = []
    try:
        servers.extend(WebProcess(database_url, directory) for directory in directories)
        with ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda server: drive(
                        "raw", server.base_url, f"/hooks/{ACCOUNT}", plan, CONCURRENCY, time_cap=60
                    ),
                    servers,
                )
            )
    finally:
        for server in servers:
            server.stop()
    answers: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        assert sorted(o.status for o in result.outcomes) == [202] * len(plan)
        for outcome in result.outcomes:
            answers.setdefault(plan[outcome.index].external_id, []).append(json.loads(outcome.body))
    assert len(answers) == POSTS
    stored = stored_state(database_url)
    assert stored.post_rows == len(stored.posts) == POSTS and stored.conversations == POSTS
    for external_id, pair in answers.items():
        assert sorted(a["duplicate"] for a in pair) == [False, True], external_id
        assert {a["conversation_id"] for a in pair} == {stored.posts[external_id]}, external_id
    for server in servers:
        assert server.log_problems() == []
    assert stored.transactions < POSTS  # some transactions stored several posts


# --- the SQLite write turn, in-process ----------------------------------------------------------


OTHER_ACCOUNT = "desk"  # a second webhook account, with the same secret


def _app_context(url: str) -> AppContext:
    text = (
        POLICY_TOML
        + WEBHOOK_ACCOUNT
        + WEBHOOK_ACCOUNT.replace(f"[accounts.{ACCOUNT}]", f"[accounts.{OTHER_ACCOUNT}]")
    )
    policy = parse_policy(tomllib.loads(text), source="tests/data/policy.toml+shop", text=text)
    engine = make_engine(url)
    upgrade(engine)
    return AppContext(policy=policy, engine=engine)


@pytest.fixture
def served(database_url: str) -> Iterator[tuple[str, AppContext]]:
    ctx = _app_context(database_url)
    hooks = {
        name: WebhookConnector(
            name, settings={"legacy_signature": True}, environ={f"WEBHOOK_SECRET_{name.upper()}": SECRET}
        )
        for name in (ACCOUNT, OTHER_ACCOUNT)
    }
    try:
        with serve_in_thread(create_app(ctx, hooks)) as url:
            yield url, ctx
    finally:
        ctx.engine.dispose()


def _post(base_url: str, external_id: str, account: str = ACCOUNT) -> httpx.Response:
    body = (
        f'{{"id":"{external_id}","author":{{"id":"a-{external_id}"}},"text":"Where is my order?",'
        f'"created_at":"{datetime.now(UTC).isoformat()}"}}'
    ).encode()
    headers = {SIGNATURE_HEADER: sign(SECRET, body), "Content-Type": "application/json"}
    return httpx.post(f"{base_url}/hooks/{account}", content=body, headers=headers, timeout=30)


class _Overlap:
    """Wraps bot.web._store_deliveries (a transaction of deliveries): how many ran at once, at
    most, in all and for one account; waits a little inside each call."""

    def __init__(self, wait: float) -> None:
        self.original = bot.web._store_deliveries
        self.wait = wait
        self.lock = threading.Lock()
        self.running: Counter[str] = Counter()
        self.most = 0
        self.most_for_one_account = 0

    def __call__(self, *args: Any) -> Any:
        account = args[1]
        with self.lock:
            self.running[account] += 1
            self.most = max(self.most, self.running.total())
            self.most_for_one_account = max(self.most_for_one_account, self.running[account])
        try:
            time.sleep(self.wait)  # widen the window in which another call could overlap
            return self.original(*args)
        finally:
            with self.lock:
                self.running[account] -= 1


def test_deliveries_take_turns_on_sqlite_and_run_side_by_side_on_postgres(
    served: tuple[str, AppContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, ctx = served
    overlap = _Overlap(wait=0.01)
    monkeypatch.setattr(bot.web, "_store_deliveries", overlap)
    accounts = (ACCOUNT, OTHER_ACCOUNT)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(
            pool.map(lambda i: _post(base_url, f"turn-{i}", accounts[i % 2]), range(2 * CONCURRENCY))
        )
    assert [a.status_code for a in answers] == [202] * (2 * CONCURRENCY)
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Post)) == 2 * CONCURRENCY
    if ctx.engine.dialect.name == "sqlite":
        assert overlap.most == 1  # one writer for the whole process
    else:
        # Two accounts' transactions side by side; one account's deliveries wait for its writer
        # and go in its next transaction together.
        assert overlap.most > 1
        assert overlap.most_for_one_account == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_delivery_that_does_not_get_its_turn_in_time_is_503(
    served: tuple[str, AppContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, ctx = served
    release = threading.Event()
    entered = threading.Event()
    original = bot.web._store_deliveries

    def slow_first(*args: Any) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return original(*args)

    monkeypatch.setattr(bot.web, "_store_deliveries", slow_first)
    monkeypatch.setattr(bot.web, "SQLITE_WRITE_WAIT", 0.3)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, base_url, "holds-the-turn")
        assert entered.wait(10)
        second = _post(base_url, "waits-too-long")
        release.set()
        assert first.result().status_code == 202
    assert second.status_code == 503 and "retry" in second.json()["error"]
    assert _post(base_url, "waits-too-long").status_code == 202  # the retry is stored
    with ctx.sessions() as session:
        stored = set(session.scalars(select(Post.external_id)))
    assert stored == {"holds-the-turn", "waits-too-long"}
