"""The HTTP app: signed webhook deliveries in, health and Prometheus metrics out.

Served by uvicorn (`serve`); `replyclock web` builds it with `create_app`. Other HTTP
features (Slack's ``/slack/events``) join through ``extra_routes``.

Routes:
    ``POST /hooks/{account}``  a signed delivery for a webhook account (see connectors.webhook).
    ``GET /healthz``           database reachability and each account's last success.
    ``GET /metrics``           Prometheus text format (see bot.reports.metrics).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import uvicorn
from sqlalchemy import select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm.exc import StaleDataError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.httputil import BodyTooLarge, read_body
from bot.reports.metrics import build_registry, exposition
from bot.telemetry import record_ingested, record_webhook_request
from connectors.base import Connector, InboundPost
from connectors.webhook import SIGNATURE_HEADER, WebhookConnector, WebhookError, parse_delivery
from storage.db import READ_ONLY
from storage.models import Account, Post

log = logging.getLogger("replyclock.web")

MAX_BODY_BYTES = 64 * 1024
# Metrics label for requests to accounts that do not exist: never the attacker-chosen path segment.
UNKNOWN_ACCOUNT = "-"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
STALE_RETRIES = 5  # attempts to store a delivery whose conversation another process changed meanwhile
# How long a delivery waits for its turn to write on SQLite before the answer is 503 (retry
# later): as long as SQLite's own busy timeout (storage.db) let it wait before.
SQLITE_WRITE_WAIT = 30.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class _Stored:
    duplicate: bool
    conversation_id: int | None
    stored: int


def create_app(
    ctx: AppContext,
    connectors: Mapping[str, Connector],
    *,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The replyclock HTTP app.

    Args:
        ctx: the process context (policy, database, clock).
        connectors: every configured connector by account name; the webhook ones receive deliveries.
        extra_routes: more routes to serve (for example Slack's events endpoint).

    Returns:
        A Starlette app; its ``state.metrics_registry`` is the app's own Prometheus registry.
    """
    hooks = {name: c for name, c in connectors.items() if isinstance(c, WebhookConnector)}
    for name, hook in hooks.items():
        account = ctx.policy.accounts.get(name)
        if hook.reply_url is None and account is not None and account.can_reply:
            log.warning(
                "webhook account has no reply_url but can_reply is true: acknowledgements will fail",
                extra={"account": name},
            )
    registry = build_registry(ctx)
    # SQLite has one writer at a time and every delivery is a write transaction (BEGIN IMMEDIATE).
    # Concurrent deliveries take turns here, first come first served, instead of waiting in
    # SQLite's busy handler, which sleeps and retries: under load that let one delivery wait
    # seconds while later ones overtook it, each waiting one holding a worker thread.
    write_turn = anyio.Lock() if ctx.engine.dialect.name == "sqlite" else None

    async def receive_hook(request: Request) -> Response:
        name = request.path_params["account"]
        hook = hooks.get(name)
        if hook is None:
            return _answer(request, UNKNOWN_ACCOUNT, 404, {"error": "no such webhook account"})
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return _answer(
                request,
                name,
                413,
                {"error": f"body larger than {MAX_BODY_BYTES} bytes"},
                headers={"Connection": "close"},
            )
        except ValueError as error:
            return _answer(request, name, 400, {"error": str(error), "field": "content-length"})
        except ClientDisconnect:
            return _answer(request, name, 400, {"error": "client disconnected"})
        if not hook.verify(body, request.headers.get(SIGNATURE_HEADER)):
            return _answer(request, name, 401, {"error": f"missing or bad {SIGNATURE_HEADER} signature"})
        try:
            post = parse_delivery(body, now=ctx.clock.now())
        except WebhookError as error:
            return _answer(
                request, name, 400, {"error": error.message, "field": error.field}, field=error.field
            )
        try:
            stored = await _in_turn(write_turn, _store, ctx, name, hook, post)
        except (SQLAlchemyError, TimeoutError) as error:
            log.error(
                "webhook delivery not stored: database error",
                extra={"account": name, "error": type(error).__name__},
            )
            return _answer(request, name, 503, {"error": "database unavailable, retry later"})
        except Exception:
            log.exception("webhook delivery not stored", extra={"account": name})
            return _answer(request, name, 500, {"error": "internal error"})
        record_ingested(name, hook.kind, stored.stored)
        return _answer(
            request,
            name,
            202,
            {"status": "accepted", "duplicate": stored.duplicate, "conversation_id": stored.conversation_id},
            external_id=post.external_id,
            conversation_id=stored.conversation_id,
            duplicate=stored.duplicate,
        )

    async def healthz(_request: Request) -> Response:
        ok, report = await run_in_threadpool(_health, ctx)
        return JSONResponse(report, status_code=200 if ok else 503)

    async def metrics(_request: Request) -> Response:
        content, content_type = await run_in_threadpool(exposition, registry)
        return Response(content, media_type=content_type)

    app = Starlette(
        routes=[
            Route("/hooks/{account}", receive_hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *extra_routes,
        ]
    )
    app.state.metrics_registry = registry
    return app


def _answer(
    request: Request,
    account: str,
    status: int,
    content: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    **details: Any,
) -> Response:
    """Count, log (never the body or the signature) and answer one webhook request."""
    record_webhook_request(account, status)
    extra: dict[str, Any] = {"account": account, "status": status, **details}
    if request.client is not None:
        extra["client"] = request.client.host
    if status >= 300:
        extra["reason"] = content.get("error")
    log.info("webhook accepted" if status < 300 else "webhook refused", extra=extra)
    return JSONResponse(dict(content), status_code=status, headers=dict(headers) if headers else None)


def _store(ctx: AppContext, name: str, hook: WebhookConnector, post: InboundPost) -> _Stored:
    """Ingest one delivery in one transaction; a repeated id is stored once.

    When another process changed the delivery's conversation between our read and our write (a
    sweep, a Slack action: its version moved on), the transaction fails with StaleDataError and
    keeps nothing: it is run again on fresh rows, a few times, before the sender hears 503.
    """
    for attempt in range(1, STALE_RETRIES + 1):
        try:
            return _store_once(ctx, name, hook, post)
        except StaleDataError:
            if attempt == STALE_RETRIES:
                raise
            log.info("webhook delivery met a concurrent change; storing it again", extra={"account": name})
    raise AssertionError("unreachable")


def _store_once(ctx: AppContext, name: str, hook: WebhookConnector, post: InboundPost) -> _Stored:
    now = ctx.clock.now()
    with ctx.sessions() as session, session.begin():
        result = ingest_batch(session, ctx, account=name, posts=[post], is_own=hook.is_own)
        session.execute(
            update(Account).where(Account.name == name).values(last_success_at=now, last_error=None)
        )
        conversation_id = session.scalar(
            select(Post.conversation_id)
            .join(Account, Account.id == Post.account_id)
            .where(Account.name == name, Post.external_id == post.external_id)
        )
    return _Stored(duplicate=result.stored == 0, conversation_id=conversation_id, stored=result.stored)


async def _in_turn(turn: anyio.Lock | None, func: Callable[..., _T], *args: Any) -> _T:
    """Run blocking `func` in a worker thread; with a `turn`, once it is this call's turn.

    Raises:
        TimeoutError: the turn did not come within SQLITE_WRITE_WAIT seconds.
    """
    if turn is None:
        return await run_in_threadpool(func, *args)
    with anyio.fail_after(SQLITE_WRITE_WAIT):
        await turn.acquire()
    try:
        # Not abandoned on cancellation: the turn passes on only once the thread has finished.
        return await run_in_threadpool(func, *args)
    finally:
        turn.release()


def _health(ctx: AppContext) -> tuple[bool, dict[str, Any]]:
    """Whether the database answers, and every account's last success (blocking)."""
    now = ctx.clock.now()
    accounts: dict[str, dict[str, Any]] = {
        name: {
            "kind": account.kind,
            "last_success_at": None,
            "parked_until": None,
            "parked": False,
            "last_error": None,
        }
        for name, account in sorted(ctx.policy.accounts.items())
    }
    try:
        with ctx.engine.execution_options(**{READ_ONLY: True}).connect() as connection:
            connection.execute(text("SELECT 1"))
            rows = list(
                connection.execute(
                    select(
                        Account.name,
                        Account.kind,
                        Account.last_success_at,
                        Account.parked_until,
                        Account.last_error,
                    )
                )
            )
    except SQLAlchemyError as error:
        log.warning("health check: database unreachable", extra={"error": type(error).__name__})
        return False, {
            "status": "unavailable",
            "time": now.isoformat(),
            "database": {"ok": False, "error": type(error).__name__},
            "accounts": {name: {"kind": entry["kind"]} for name, entry in accounts.items()},
        }
    for name, kind, last_success_at, parked_until, last_error in rows:
        accounts[name] = {
            "kind": kind,
            "last_success_at": last_success_at.isoformat() if last_success_at else None,
            "parked_until": parked_until.isoformat() if parked_until else None,
            "parked": parked_until is not None and parked_until > now,
            "last_error": last_error[:500] if last_error else None,
        }
    return True, {"status": "ok", "time": now.isoformat(), "database": {"ok": True}, "accounts": accounts}


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    # log_config=None keeps replyclock's JSON logging; webhook requests are logged by the app itself.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )


def serve(app: ASGIApp, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve `app` with uvicorn until SIGINT/SIGTERM (blocking)."""
    uvicorn.Server(_config(app, host, port)).run()


def bind_address(environ: Mapping[str, str]) -> tuple[str, int]:
    """``HOST`` (default 0.0.0.0) and ``PORT`` (default 8000, the Procfile convention) from `environ`.

    Raises:
        SettingsError: (a ValueError) naming the variable, for a port that is not 0-65535.
    """
    from bot.config.settings import load_settings

    settings = load_settings({k: environ[k] for k in ("HOST", "PORT") if k in environ})
    return settings.host, settings.port


@contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` on a real uvicorn server in a background thread (tests, the demo).

    Yields:
        The base URL, such as ``http://127.0.0.1:54321`` (port 0 picks a free port).
    """
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket whose proto
    # says TCP; without it every answer on a kept-alive connection waited ~40 ms (delayed ACK).
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, host, bound_port))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="replyclock-web", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
