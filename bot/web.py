"""The HTTP app: signed webhook deliveries in, health and Prometheus metrics out.

Served by uvicorn (`serve`); `replyclock web` builds it with `create_app`. Other HTTP
features (Slack's ``/slack/events``) join through ``extra_routes``.

Two apps (issue 11: operator endpoints apart from the public edge):

`create_app`, the public one (``HOST``:``PORT``):
    ``POST /hooks/{account}``  a signed delivery for a webhook account (see connectors.webhook).
    ``GET /healthz``           ``{"status": "ok"}`` (200) or ``{"status": "unavailable"}`` (503), nothing more.
    With an operator token (``OPERATOR_TOKEN``), also ``GET /metrics`` and ``GET /healthz/details``
    for ``Authorization: Bearer <token>`` only (401 otherwise).

`create_operator_app`, the operator listener (``OPERATOR_HOST``, default 127.0.0.1, and
``OPERATOR_PORT``, default 9464; ``off`` for none):
    ``GET /healthz``           database reachability and each account's last success and error.
    ``GET /metrics``           Prometheus text format (see bot.reports.metrics).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy import select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm.exc import StaleDataError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from bot.flow.context import AppContext
from bot.flow.ingest import ingest_batch
from bot.httputil import BodyTooLarge, read_body
from bot.logs import redact_urls
from bot.reports.metrics import build_registry, exposition
from bot.telemetry import record_ingested, record_webhook_request
from connectors.base import Connector, InboundPost
from connectors.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TIMESTAMP_TOLERANCE,
    WebhookConnector,
    WebhookError,
    parse_delivery,
    timestamp_problem,
)
from storage.db import READ_ONLY
from storage.models import Account, Post
from storage.seen import remember_all, stored_key

log = logging.getLogger("replyclock.web")

MAX_BODY_BYTES = 64 * 1024
# Metrics label for requests to accounts that do not exist: never the attacker-chosen path segment.
UNKNOWN_ACCOUNT = "-"
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
DEFAULT_OPERATOR_HOST = "127.0.0.1"
DEFAULT_OPERATOR_PORT = 9464
STALE_RETRIES = 5  # attempts to store a delivery whose conversation another process changed meanwhile
# How long a delivery waits for its turn to write on SQLite before the answer is 503 (retry
# later): as long as SQLite's own busy timeout (storage.db) let it wait before.
SQLITE_WRITE_WAIT = 30.0
BATCH_LIMIT = 100  # deliveries stored together in one transaction, at most

UNSIGNED = "missing, stale or bad signature (webhook-id, webhook-timestamp, webhook-signature)"


@dataclass(frozen=True)
class _Stored:
    duplicate: bool
    conversation_id: int | None
    stored: int


@dataclass(frozen=True)
class _Delivery:
    """A valid delivery to store: its post, and its ``webhook-id`` key with the key's expiry."""

    post: InboundPost
    seen: tuple[str, datetime] | None = None


def create_app(
    ctx: AppContext,
    connectors: Mapping[str, Connector],
    *,
    extra_routes: Sequence[BaseRoute] = (),
    operator_token: str | None = None,
) -> Starlette:
    """The replyclock public HTTP app.

    Args:
        ctx: the process context (policy, database, clock).
        connectors: every configured connector by account name; the webhook ones receive deliveries.
        extra_routes: more routes to serve (for example Slack's events endpoint).
        operator_token: when given, ``/metrics`` and ``/healthz/details`` are served here too,
            to ``Authorization: Bearer <operator_token>`` only.

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
    group = _GroupCommit(ctx, hooks)

    async def receive_hook(request: Request) -> Response:
        name = request.path_params["account"]
        hook = hooks.get(name)
        now = ctx.clock.now()
        # Unknown and known accounts answer an unsigned (or stale) request alike, before any of
        # the body is read: the answer tells nobody which account names exist.
        problem = timestamp_problem(request.headers, now)
        legacy = hook is not None and hook.legacy_signature and SIGNATURE_HEADER in request.headers
        if hook is None or (problem is not None and not legacy):
            return _answer(request, name if hook else UNKNOWN_ACCOUNT, 401, {"error": UNSIGNED})
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
        message_id = hook.verify_standard(body, request.headers, now) if problem is None else None
        if message_id is None and not (legacy and hook.verify(body, request.headers.get(SIGNATURE_HEADER))):
            return _answer(request, name, 401, {"error": UNSIGNED})
        seen = None
        if message_id is not None:
            # Remembered for as long as its timestamp is acceptable (it may be up to the tolerance
            # ahead of our clock), and a minute more.
            signed_at = datetime.fromtimestamp(int(request.headers[TIMESTAMP_HEADER]), UTC)
            seen = (f"webhook:{name}:{message_id}", signed_at + TIMESTAMP_TOLERANCE + timedelta(minutes=1))
        try:
            post = parse_delivery(body, now=ctx.clock.now())
        except WebhookError as error:
            return _answer(
                request, name, 400, {"error": error.message, "field": error.field}, field=error.field
            )
        try:
            stored = await group.store(name, _Delivery(post, seen))
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
        ok = await run_in_threadpool(_database_ok, ctx)
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    operator = (
        _operator_routes(ctx, registry, token=operator_token, health_path="/healthz/details")
        if operator_token
        else []
    )
    app = Starlette(
        routes=[
            Route("/hooks/{account}", receive_hook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *operator,
            *extra_routes,
        ]
    )
    # Starlette answers a path with or without its trailing slash (``/hooks/shop%2f``) with a 307
    # to an absolute URL built from the request's Host header: a redirect anyone could point at
    # any host. No route here wants a redirect, so none is ever sent.
    app.router.redirect_slashes = False
    app.state.metrics_registry = registry
    return app


def create_operator_app(ctx: AppContext) -> Starlette:
    """The operator listener's app: detailed ``/healthz`` and ``/metrics`` (bind it to loopback)."""
    registry = build_registry(ctx)
    app = Starlette(routes=_operator_routes(ctx, registry, token=None))
    app.router.redirect_slashes = False
    app.state.metrics_registry = registry
    return app


def _operator_routes(
    ctx: AppContext, registry: CollectorRegistry, *, token: str | None, health_path: str = "/healthz"
) -> list[Route]:
    """``/healthz`` (detailed) and ``/metrics``; with a `token`, for its bearer only."""
    expected = f"Bearer {token}".encode() if token else None

    def allowed(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
        return hmac.compare_digest(given, expected)

    async def healthz(request: Request) -> Response:
        if not allowed(request):
            return JSONResponse({"error": "operator token required"}, status_code=401)
        ok, report = await run_in_threadpool(_health, ctx)
        return JSONResponse(report, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        if not allowed(request):
            return JSONResponse({"error": "operator token required"}, status_code=401)
        content, content_type = await run_in_threadpool(exposition, registry)
        return Response(content, media_type=content_type)

    return [Route(health_path, healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]


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


class _Waiting:
    """A delivery in its queue, and what its request waits for."""

    __slots__ = ("account", "delivery", "outcome", "taken")

    def __init__(self, account: str, delivery: _Delivery, outcome: asyncio.Future[_Stored]) -> None:
        self.account = account
        self.delivery = delivery
        self.outcome = outcome
        self.taken = False  # in a batch being stored: it can no longer be withdrawn


class _GroupCommit:
    """Group commit: deliveries that wait to be stored at the same time share one transaction.

    Every delivery joins a queue; a writer takes everything waiting in it (of one account, up to
    BATCH_LIMIT, first come first served), stores it in one transaction on a worker thread and
    answers each request with its own outcome once that transaction is committed. A delivery
    that finds a writer free is taken at once, alone: nothing waits for company. While a batch is
    being stored the next deliveries gather, so under load each transaction carries many.

    SQLite has one writer at a time, and every delivery is a write transaction (BEGIN IMMEDIATE):
    there is one queue for the process and one writer, so deliveries take turns here instead of
    waiting in SQLite's busy handler, which sleeps and retries (under load that let one delivery
    wait seconds while later ones overtook it, each waiting one holding a worker thread). A
    delivery not taken within SQLITE_WRITE_WAIT seconds leaves the queue unstored (503). On
    PostgreSQL each account has its own queue and writer (other processes have theirs). One
    writer per account, not two, measured best there too: a second writer took the few
    deliveries that arrived while the first was busy, so transactions carried fewer, and the
    process spent 40 to 45 % more CPU per delivery for 10 % less throughput.

    If a batch's transaction fails, it keeps nothing, and its deliveries are stored again one at
    a time (`_store`, each in its own transaction), so one bad delivery fails no other.
    """

    def __init__(self, ctx: AppContext, hooks: Mapping[str, WebhookConnector]) -> None:
        self.ctx = ctx
        self.hooks = hooks
        self.single_writer = ctx.engine.dialect.name == "sqlite"
        self.queues: dict[str, deque[_Waiting]] = {}
        self.writers: dict[str, asyncio.Task[None]] = {}  # by queue, while it has one

    async def store(self, account: str, delivery: _Delivery) -> _Stored:
        """Store `delivery` for `account` (with whatever else waits); its outcome once committed.

        Raises:
            TimeoutError: (SQLite) not taken within SQLITE_WRITE_WAIT seconds; nothing stored.
            Exception: what storing it alone raised (see `_store`).
        """
        waiting = _Waiting(account, delivery, asyncio.get_running_loop().create_future())
        lane = "" if self.single_writer else account
        queue = self.queues.setdefault(lane, deque())
        queue.append(waiting)
        if lane not in self.writers:
            self.writers[lane] = asyncio.create_task(self._write(lane, queue))
        try:
            if not self.single_writer:
                return await asyncio.shield(waiting.outcome)
            try:
                return await asyncio.wait_for(asyncio.shield(waiting.outcome), SQLITE_WRITE_WAIT)
            except TimeoutError:
                if not waiting.taken:
                    raise
            return await asyncio.shield(waiting.outcome)
        finally:
            # Withdrawn unless taken: a writer skips a delivery whose request no longer waits.
            # Taken, it is stored anyway, and the outcome goes unread.
            if not waiting.outcome.done():
                waiting.outcome.cancel()

    async def _write(self, lane: str, queue: deque[_Waiting]) -> None:
        """Store batches from `queue` until it is empty."""
        batch: list[_Waiting] = []
        try:
            while queue:
                batch = self._take(queue)
                if batch:
                    await self._store_batch(batch)
        except Exception as error:
            # A fault here, not in storing (that is each delivery's own outcome): no request
            # is left waiting for an answer.
            for waiting in (*batch, *queue):
                if not waiting.outcome.done():
                    waiting.outcome.set_exception(error)
            queue.clear()
        except BaseException:
            # Cancelled: the server is stopping, and nobody will answer these requests any more.
            for waiting in (*batch, *queue):
                waiting.outcome.cancel()
            queue.clear()
            raise
        finally:
            del self.writers[lane]

    @staticmethod
    def _take(queue: deque[_Waiting]) -> list[_Waiting]:
        """The deliveries to store together: the first waiting one's account's, in order."""
        account: str | None = None
        batch: list[_Waiting] = []
        rest: list[_Waiting] = []
        for waiting in queue:
            if waiting.outcome.done():
                continue  # withdrawn: its request no longer waits
            if account is None:
                account = waiting.account
            if waiting.account == account and len(batch) < BATCH_LIMIT:
                waiting.taken = True
                batch.append(waiting)
            else:
                rest.append(waiting)
        queue.clear()
        queue.extend(rest)
        return batch

    async def _store_batch(self, batch: list[_Waiting]) -> None:
        account = batch[0].account
        hook = self.hooks[account]
        if len(batch) > 1:
            try:
                outcomes = await run_in_threadpool(
                    _store_deliveries, self.ctx, account, hook, [w.delivery for w in batch]
                )
            except Exception as error:
                log.log(
                    logging.INFO if isinstance(error, StaleDataError) else logging.WARNING,
                    "webhook batch not stored; storing its deliveries one at a time",
                    extra={"account": account, "deliveries": len(batch), "error": type(error).__name__},
                )
            else:
                for waiting, outcome in zip(batch, outcomes, strict=True):
                    if not waiting.outcome.done():
                        waiting.outcome.set_result(outcome)
                return
        for waiting in batch:
            try:
                outcome = await run_in_threadpool(_store, self.ctx, account, hook, waiting.delivery)
            except Exception as error:
                if not waiting.outcome.done():
                    waiting.outcome.set_exception(error)
            else:
                if not waiting.outcome.done():
                    waiting.outcome.set_result(outcome)


def _store(ctx: AppContext, name: str, hook: WebhookConnector, delivery: _Delivery) -> _Stored:
    """Store one delivery in its own transaction; a repeated id is stored once.

    When another process changed the delivery's conversation between our read and our write (a
    sweep, a Slack action: its version moved on), the transaction fails with StaleDataError and
    keeps nothing: it is run again on fresh rows, a few times, before the sender hears 503.
    """
    for attempt in range(1, STALE_RETRIES + 1):
        try:
            return _store_deliveries(ctx, name, hook, [delivery])[0]
        except StaleDataError:
            if attempt == STALE_RETRIES:
                raise
            log.info("webhook delivery met a concurrent change; storing it again", extra={"account": name})
    raise AssertionError("unreachable")


def _store_deliveries(
    ctx: AppContext, name: str, hook: WebhookConnector, deliveries: Sequence[_Delivery]
) -> list[_Stored]:
    """Store deliveries of one account in one transaction; each one's outcome, in order.

    A replayed ``webhook-id`` (`seen`) or a known post changes nothing: the delivery is a
    duplicate. Of two deliveries here with the same id or post, the first counts and the second
    is its duplicate, as if they had come one after the other. Message ids are recorded in the
    same transaction as the posts, so a delivery that failed (503) is accepted when the sender
    retries it with the same id. Only a batch that stored something marks the account healthy:
    a duplicate (a replay, a retry) never clears an error.
    """
    now = ctx.clock.now()
    keys: dict[str, datetime] = {}
    for delivery in deliveries:
        if delivery.seen is not None:
            keys.setdefault(stored_key(delivery.seen[0]), delivery.seen[1])
    with ctx.sessions() as session, session.begin():
        recorded = remember_all(session, keys, now=now)
        # The deliveries to ingest: no id, or the first with its id when the id is new.
        fresh = []
        for delivery in deliveries:
            if delivery.seen is None:
                fresh.append(delivery)
                continue
            key = stored_key(delivery.seen[0])
            if key in recorded:
                recorded.discard(key)
                fresh.append(delivery)
        conversations: dict[str, int | None] = {}
        if fresh:
            conversations = ingest_batch(
                session, ctx, account=name, posts=[d.post for d in fresh], is_own=hook.is_own
            ).conversations
        if conversations:
            session.execute(
                update(Account).where(Account.name == name).values(last_success_at=now, last_error=None)
            )
        # Which delivery stored each post: the first of the fresh ones with its id.
        storing = {}
        for delivery in reversed(fresh):
            if delivery.post.external_id in conversations:
                storing[delivery.post.external_id] = delivery
        others = {d.post.external_id for d in deliveries} - conversations.keys()
        known: dict[str, int | None] = {}
        if others:
            known = {
                external_id: conversation_id
                for external_id, conversation_id in session.execute(
                    select(Post.external_id, Post.conversation_id)
                    .join(Account, Account.id == Post.account_id)
                    .where(Account.name == name, Post.external_id.in_(sorted(others)))
                )
            }
    outcomes = []
    for delivery in deliveries:
        external_id = delivery.post.external_id
        stored = storing.get(external_id) is delivery
        conversation_id = (
            conversations[external_id] if external_id in conversations else known.get(external_id)
        )
        outcomes.append(_Stored(duplicate=not stored, conversation_id=conversation_id, stored=int(stored)))
    return outcomes


def _database_ok(ctx: AppContext) -> bool:
    """Whether the database answers (blocking): all the public /healthz tells."""
    try:
        with ctx.engine.execution_options(**{READ_ONLY: True}).connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        log.warning("health check: database unreachable", extra={"error": type(error).__name__})
        return False
    return True


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
            "last_error": redact_urls(last_error)[:500] if last_error else None,
        }
    return True, {"status": "ok", "time": now.isoformat(), "database": {"ok": True}, "accounts": accounts}


# Connection discipline (issue 11): what a client may hold open, and for how long.
REQUEST_TIMEOUT = 10.0  # from a request's first byte to its last body byte (headers and body)
KEEP_ALIVE_TIMEOUT = 5  # an idle kept-alive connection (uvicorn's own timer)
MAX_CONNECTIONS = 1000  # open connections per listener; more are closed as soon as accepted
MAX_HEADER_BYTES = 16 * 1024  # h11's limit on a request head (uvicorn's default is 64 KiB)
ACCEPT_ERROR_LOG_INTERVAL = 10.0  # seconds between two log lines about the same asyncio error


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits uvicorn lacks.

    uvicorn closes an idle kept-alive connection after ``timeout_keep_alive`` but has no timer at
    all while a request is arriving: a client that sends half a header, nothing at all after
    connecting, or one body byte every two seconds held its connection (and a file descriptor)
    forever. Here every request, from the connection's start or its first byte to its last
    body byte, must arrive within `REQUEST_TIMEOUT`, or the connection is closed (a listener
    waiting for the body sees a disconnect). At most `MAX_CONNECTIONS` connections are open at once;
    one more is closed on arrival, before it costs anything else.
    """

    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_for: object = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _over_capacity_log.warning("connection refused: too many open connections")
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of a new request on a kept-alive connection
        super().data_received(data)
        cycle = self.cycle
        # Headers and body are in: the app may take its time.
        if (
            self._deadline is not None
            and cycle is not None
            and cycle is not self._armed_for
            and not cycle.more_body
        ):
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info(
                "connection closed: request not received in time", extra={"timeout": self.request_timeout}
            )
            self.transport.close()


class _RateLimited(logging.Filter):
    """Lets one record per message through every `interval` seconds, counting the rest.

    On the ``asyncio`` logger: when the process runs out of file descriptors, the event loop
    reports ``socket.accept() out of system resource`` on every attempt (about 12,500 lines a
    second, 197 MB in 25 s, were seen); one line per interval says the same.
    """

    def __init__(self, interval: float = ACCEPT_ERROR_LOG_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:200]
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.suppressed = suppressed
        return True


_over_capacity_log = logging.getLogger("replyclock.web.connections")
_ACCEPT_FILTER = _RateLimited()


def limit_repeated_logs() -> None:
    """Install the rate limit on the loggers that repeat themselves under a connection flood."""
    for name in ("asyncio", "replyclock.web.connections", "uvicorn.error"):
        logger = logging.getLogger(name)
        if _ACCEPT_FILTER not in logger.filters:
            logger.addFilter(_ACCEPT_FILTER)


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    # log_config=None keeps replyclock's JSON logging; webhook requests are logged by the app itself.
    limit_repeated_logs()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
        http=GuardedH11Protocol,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=1024,
    )


class _NoSignals(uvicorn.Server):
    """A second server in the same loop: the first one handles SIGINT/SIGTERM for both."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(
    app: ASGIApp,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    operator: tuple[ASGIApp, str, int] | None = None,
) -> None:
    """Serve `app` (and the `operator` app on its own address) with uvicorn until SIGINT/SIGTERM."""
    public = uvicorn.Server(_config(app, host, port))
    if operator is None:
        public.run()
        return
    side = _NoSignals(_config(*operator))

    async def both() -> None:
        task = asyncio.create_task(side.serve())
        try:
            await public.serve()
        finally:
            side.should_exit = True
            await task

    asyncio.run(both())


def operator_address(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """``OPERATOR_HOST`` (default 127.0.0.1) and ``OPERATOR_PORT`` (default 9464; ``off``: none)."""
    host = environ.get("OPERATOR_HOST", "").strip() or DEFAULT_OPERATOR_HOST
    raw_port = environ.get("OPERATOR_PORT", "").strip() or str(DEFAULT_OPERATOR_PORT)
    if raw_port.lower() == "off":
        return None
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise ValueError(f"OPERATOR_PORT must be a TCP port number or off, not {raw_port!r}")
    return host, int(raw_port)


def operator_token(environ: Mapping[str, str]) -> str | None:
    """``OPERATOR_TOKEN``: when set (32 characters at least), the public listener serves the
    operator endpoints too, to its bearer only."""
    token = environ.get("OPERATOR_TOKEN", "").strip()
    if not token:
        return None
    if len(token) < 32:
        raise ValueError("OPERATOR_TOKEN must be at least 32 characters")
    return token


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
