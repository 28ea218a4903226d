"""The slack_bolt app: middleware, the per-request database session, and the ways to serve it.

`create_bolt_app` builds one `slack_bolt.App` for a process. Every request goes through, in order:

1. bolt's own checks (HTTP mode: signature and a timestamp within five minutes, else 401);
2. `ReplayGuard`: a signed body seen before within that window is refused with 401 (bolt does
   not dedupe: a captured request could otherwise be replayed for five minutes); the seen
   signatures are in the database, shared by all processes and kept across restarts;
3. `StaffCheck`: every interaction (click, modal submission, slash command, and any payload
   type replyclock does not handle, which is refused outright) from anyone who is not one of
   the teams' experts is refused (an ephemeral note, or the modal's error) before any listener
   or database work; the expert's id goes into ``context["expert_id"]``;
4. `DatabaseSession`: one SQLAlchemy session per request in ``context["db_session"]``.

bolt's sync middleware cannot wrap a listener (``next()`` only marks the chain as continued, and
with ``process_before_response=False`` the listener runs later on another thread), so the
session is *finished* by the listener runner's completion handler: committed when the listener
returned, rolled back when it raised (the error handler marks the request), closed either way.
Handlers that talk to Slack after a change call `commit` first, so no database lock is held
across a Web API call and nobody is told "done" before it is durable; the completion handler's
commit is then a no-op safety net.

Cards are not edited here: every change writes a ``card_update`` outbox row in the same
transaction (see bot.flow.staff) and the outbox sender edits the card. The optional ``on_change``
hook runs after each such commit so `replyclock run` can wake the sender at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from slack_bolt import App, BoltRequest, BoltResponse
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_bolt.adapter.starlette.handler import SlackRequestHandler, to_bolt_request, to_starlette_response
from slack_bolt.listener.listener_completion_handler import ListenerCompletionHandler
from slack_bolt.listener.listener_error_handler import ListenerErrorHandler
from slack_bolt.middleware import Middleware
from slack_bolt.request.payload_utils import is_slash_command, is_view_submission
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from bot.flow import staff
from bot.flow.context import AppContext
from bot.httputil import BodyTooLarge, read_body
from bot.slack import actions, commands, home, views
from bot.slack.common import APP_CONTEXT, DB_SESSION, EXPERT_ID, NOT_STAFF, ON_CHANGE, tell
from bot.slack.ids import REPLY_BLOCK, VIEW_REPLY
from storage.seen import first_time

log = logging.getLogger("replyclock.slack")

_FAILED = "replyclock_failed"

EVENTS_PATH = "/slack/events"
SIGNATURE_WINDOW_SECONDS = 5 * 60  # bolt refuses timestamps further than this from its clock


# --------------------------------------------------------------------------------------------
# Middleware


def _header(req: BoltRequest, name: str) -> str | None:
    values = req.headers.get(name)
    if not values:
        return None
    return str(next(iter(values)))


class ReplayGuard(Middleware):
    """Refuse (401) a signed request whose signature was already seen inside the signature window.

    Slack signs ``v0:<timestamp>:<body>``, so the signature identifies one delivery; bolt accepts
    it again and again for five minutes. Each signature is recorded in the ``seen_requests``
    table (storage.seen) until its timestamp leaves the window: a replay fails and changes
    nothing whichever process it reaches, and after a restart too. Slack's own retries are
    re-signed with a new timestamp, so they pass. Expired rows are deleted by the retention job.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        window_seconds: int = SIGNATURE_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.window_seconds = window_seconds
        self.clock = clock

    def process(
        self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]
    ) -> BoltResponse | None:
        if req.mode == "socket_mode":
            return next()
        signature = _header(req, "x-slack-signature")
        timestamp = _header(req, "x-slack-request-timestamp")
        if signature is None or timestamp is None:
            return next()  # unsigned: only possible with request verification off
        try:
            expires = datetime.fromtimestamp(int(timestamp) + self.window_seconds + 60, UTC)
        except (ValueError, OverflowError, OSError):
            return BoltResponse(status=401, body="")
        now = datetime.fromtimestamp(self.clock(), UTC)
        try:
            fresh = first_time(self.engine, f"slack:{signature}", expires_at=expires, now=now)
        except SQLAlchemyError as error:
            log.error("replay guard: database unavailable", extra={"error": type(error).__name__})
            return BoltResponse(status=503, body="")
        if not fresh:
            log.warning("replayed Slack request refused", extra={"timestamp": timestamp})
            return BoltResponse(status=401, body="")
        return next()


# Payload types replyclock handles. Every other interaction type (legacy ``interactive_message``
# attachments, ``dialog_submission``, shortcuts, ``block_suggestion``...) is refused for everyone.
_HANDLED_INTERACTIONS = frozenset({"block_actions", "view_submission"})
_IGNORED_INTERACTIONS = frozenset({"view_closed"})
_EVENT_TYPES = frozenset({"event_callback", "url_verification", "app_rate_limited"})


class StaffCheck(Middleware):
    """Let only the teams' experts click, submit and run commands; tell everyone else why not.

    Every request that is not an Events API delivery is an interaction and passes this gate:
    slash commands, the payload types replyclock handles (`_HANDLED_INTERACTIONS`), and any
    other type, which is refused whoever sent it (400) so that a listener bolt might match by
    ``callback_id`` or ``action_id`` on a type nobody checked never runs.
    """

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def process(
        self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]
    ) -> BoltResponse | None:
        body = req.body
        kind = body.get("type") if isinstance(body, dict) else None
        if kind in _EVENT_TYPES and not is_slash_command(body):
            return next()
        if not is_slash_command(body) and kind not in _HANDLED_INTERACTIONS:
            if kind in _IGNORED_INTERACTIONS:
                return BoltResponse(status=200, body="")
            log.info("refused an unhandled Slack payload type", extra={"type": str(kind)[:40]})
            return BoltResponse(status=400, body="")
        user_id = req.context.user_id or ""
        expert = staff.expert_for_slack_user(self.ctx.policy, user_id)
        if expert is not None:
            req.context[EXPERT_ID] = expert.id
            return next()
        log.info("refused a non-staff Slack user", extra={"user": user_id})
        if is_slash_command(body):
            return BoltResponse(status=200, body={"response_type": "ephemeral", "text": NOT_STAFF})
        if is_view_submission(body):
            if (body.get("view") or {}).get("callback_id") == VIEW_REPLY:
                return BoltResponse(
                    status=200, body={"response_action": "errors", "errors": {REPLY_BLOCK: NOT_STAFF}}
                )
            return BoltResponse(status=200, body="")
        tell(req.context.client, body, NOT_STAFF)
        return BoltResponse(status=200, body="")


class DatabaseSession(Middleware):
    """Open one database session per request and put it in ``context["db_session"]``.

    The session connects lazily (a request that never queries never takes a connection) and is
    committed or rolled back and closed when the listener finishes (`_FinishSession`).
    """

    def __init__(self, ctx: AppContext, on_change: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.on_change = on_change

    def process(
        self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]
    ) -> BoltResponse | None:
        req.context[APP_CONTEXT] = self.ctx
        req.context[DB_SESSION] = self.ctx.sessions()
        if self.on_change is not None:
            req.context[ON_CHANGE] = self.on_change
        return next()


class _FinishSession(ListenerCompletionHandler):
    """Commit (or, after an error, roll back) and close the request's session."""

    def handle(self, request: BoltRequest, response: BoltResponse | None) -> None:
        session = request.context.get(DB_SESSION)
        if not isinstance(session, Session):
            return
        try:
            if request.context.get(_FAILED):
                session.rollback()
            else:
                session.commit()
        except Exception:
            log.exception("could not finish the request's database transaction")
            session.rollback()
        finally:
            session.close()


class _MarkFailed(ListenerErrorHandler):
    """Remember that the listener raised (so the session is rolled back), then let bolt report it."""

    def __init__(self, inner: ListenerErrorHandler) -> None:
        self.inner = inner

    def handle(self, error: Exception, request: BoltRequest, response: BoltResponse | None) -> None:
        request.context[_FAILED] = True
        self.inner.handle(error=error, request=request, response=response)


# --------------------------------------------------------------------------------------------
# The app


def create_bolt_app(
    ctx: AppContext,
    *,
    token: str,
    signing_secret: str,
    client: WebClient | None = None,
    process_before_response: bool = False,
    on_change: Callable[[], None] | None = None,
) -> App:
    """The replyclock Slack app, with its middleware and every listener registered.

    Args:
        ctx: the process context (policy, clock, database).
        token: the bot token (``xoxb-...``); checked with ``auth.test`` at start.
        signing_secret: verifies HTTP-mode requests.
        client: the Web API client to use (tests point one at the stand-in); by default one
            for `token`.
        process_before_response: finish the listener before answering Slack (FaaS); by
            default bolt answers as soon as the listener acks and finishes on a thread.
        on_change: called after a listener commits a change (e.g. wake the outbox sender so
            the card follows at once).

    Returns:
        The bolt app, ready for `slack_routes` (HTTP) or `start_socket_mode`.
    """
    if client is None:
        # Slack answers 429 with Retry-After under load: wait and retry a couple of times.
        client = WebClient(token=token, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=2)])
    elif client.token is None:
        client.token = token
    # bolt takes the token from the client (passing both only logs a warning).
    app = App(
        signing_secret=signing_secret,
        client=client,
        process_before_response=process_before_response,
        # Not "replyclock": bolt copies the root logger's level and handlers onto the logger of
        # this name, which would mute (and double) every replyclock.* log line.
        name="replyclock-bolt",
    )
    app.use(ReplayGuard(ctx.engine))
    app.use(StaffCheck(ctx))
    app.use(DatabaseSession(ctx, on_change))
    runner = app.listener_runner
    runner.listener_completion_handler = _FinishSession()
    runner.listener_error_handler = _MarkFailed(runner.listener_error_handler)
    register_handlers(app)
    return app


def register_handlers(app: App) -> None:
    """Register every feature's listeners: actions, views, commands and the App Home."""
    actions.register(app)
    views.register(app)
    commands.register(app)
    home.register(app)


# --------------------------------------------------------------------------------------------
# Serving


MAX_BODY_BYTES = 1024 * 1024
"""The largest request /slack/events reads. replyclock's own payloads (a card click, the reply
modal, a slash command, ``app_home_opened``) are a few KiB; a 100-block view with every input
full stays under it."""

_ID_HOLDERS = ("user", "team", "enterprise", "channel")
# Objects bolt's context extraction looks into (``body["event"]["message"]["user"]``...).
_NESTED = ("event", "message", "previous_message", "item", "assistant_thread")
_OBJECTS = ("container", "message", "previous_message", "item", "assistant_thread", "function_data")
_STRINGS = (
    "type",
    "command",
    "text",
    "user_id",
    "channel_id",
    "team_id",
    "trigger_id",
    "response_url",
    "callback_id",
    "action_id",
    "api_app_id",
)


def payload_problem(body: Any, *, depth: int = 0) -> str | None:
    """Why a (signed) request body is not shaped like anything Slack sends, or None.

    bolt's context extraction, its listener matchers and the middleware here index payloads
    without checking types (``body["actions"][0]["action_id"]``, ``"id" in body["user"]``):
    ``actions`` as a string or ``user`` as a number would raise inside ``App.dispatch`` and
    answer 500. This checks the types of the fields those read (at the top, and the ids bolt
    looks for inside ``event``, ``message`` and the like), so such a body is a 400 and never
    reaches a listener. Anything else in a payload may be whatever Slack sends.
    """
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    for key in _ID_HOLDERS:
        value = body.get(key)
        if isinstance(value, dict):
            if not isinstance(value.get("id"), str | None):
                return f"{key}.id is not a string"
        elif not isinstance(value, str | None):
            return f"{key} is neither an object nor a string"
    if "authorizations" in body:
        authorizations = body["authorizations"]
        if not isinstance(authorizations, list) or not all(isinstance(item, dict) for item in authorizations):
            return "authorizations is not a list of objects"
        if authorizations and depth < 3:
            problem = payload_problem(authorizations[0], depth=depth + 1)
            if problem is not None:
                return f"authorizations[0].{problem}"
    for key in _NESTED:
        if isinstance(body.get(key), dict) and depth < 3:
            problem = payload_problem(body[key], depth=depth + 1)
            if problem is not None:
                return f"{key}.{problem}"
    if depth > 0:
        return None
    # The top level: what bolt's matchers, the middleware here and the listeners read.
    for key in _STRINGS:
        if key in body and not isinstance(body[key], str | None):
            return f"{key} is not a string"
    for key in _OBJECTS:
        if not isinstance(body.get(key), dict | None):
            return f"{key} is not an object"
    if "event" in body:
        event = body["event"]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return "event is not an object with a type"
    if "actions" in body:
        actions = body["actions"]
        if not isinstance(actions, list) or not actions:
            return "actions is not a non-empty list"
        for action in actions:
            if not isinstance(action, dict):
                return "actions[] is not an object"
            # Block actions name their element; legacy attachment actions have a name instead.
            if body.get("type") == "block_actions" and not isinstance(action.get("action_id"), str):
                return "actions[].action_id is not a string"
            if not isinstance(action.get("block_id"), str | None):
                return "actions[].block_id is not a string"
    if "view" in body:
        view = body["view"]
        if not isinstance(view, dict):
            return "view is not an object"
        for key in ("type", "callback_id"):
            if not isinstance(view.get(key), str):
                return f"view.{key} is not a string"
        if not isinstance(view.get("private_metadata"), str | None):
            return "view.private_metadata is not a string"
        state = view.get("state")
        if state is not None:
            values = state.get("values") if isinstance(state, dict) else []
            if not isinstance(values, dict | None) or not all(
                isinstance(block, dict) and all(isinstance(element, dict) for element in block.values())
                for block in (values or {}).values()
            ):
                return "view.state is not {values: {block: {action: object}}}"
    if "response_urls" in body and not (
        isinstance(body["response_urls"], list)
        and all(isinstance(item, dict) for item in body["response_urls"])
    ):
        return "response_urls is not a list of objects"
    return None


def signature_valid(
    signing_secret: str, body: bytes, timestamp: str | None, signature: str | None, now: float
) -> bool:
    """Slack's ``v0`` signature over the raw bytes, with the timestamp inside bolt's window.

    Unlike ``SignatureVerifier.is_valid`` (which bolt uses) this never raises: a timestamp that
    is not a number or too big for a float, a body that is not UTF-8 or a signature with
    non-ASCII characters is simply not valid.
    """
    if not timestamp or not signature:
        return False
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(int(now) - sent) > SIGNATURE_WINDOW_SECONDS:  # ints: a 400-digit timestamp is no float
        return False
    base = b"v0:" + timestamp.encode("latin-1") + b":" + body
    expected = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.encode("latin-1", errors="replace"))


def _headers_plausible(timestamp: str | None, signature: str | None, now: float) -> bool:
    """Both signature headers present, the signature shaped ``v0=<64 hex>``, the timestamp fresh."""
    if not timestamp or not signature or not signature.startswith("v0=") or len(signature) != 67:
        return False
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    return abs(int(now) - int(timestamp)) <= SIGNATURE_WINDOW_SECONDS


def _refuse(status: int, reason: str, *, close: bool = False) -> Response:
    log.info("Slack request refused", extra={"status": status, "reason": reason})
    headers = {"Connection": "close"} if close else None
    return Response(reason, status_code=status, media_type="text/plain", headers=headers)


class _ThreadedSlackRequestHandler(SlackRequestHandler):
    """bolt's Starlette adapter, with the (blocking) dispatch moved off the event loop, and a
    front door that answers every hostile request with a 4xx before bolt sees it.

    The stock handler calls the sync ``App.dispatch`` inside ``async def handle``: every Slack
    request (database work, the wait for ``ack()``) would stall the loop that also serves
    webhooks, ``/healthz`` and ``/metrics``, and two clicks could never be processed at once.

    It also reads the whole body into memory (``await req.body()``) and parses it before bolt
    checks the signature: a 10 MB body was read, a body that is not UTF-8 or not JSON, or nested
    100,000 deep, raised in the adapter (500), and bolt logged every badly signed body in full.
    Here the body is capped at `MAX_BODY_BYTES` (413), the signature is checked over the raw
    bytes before anything parses them (401), and a signed body that does not parse or is not
    shaped like a Slack payload (`payload_problem`) is a 400. bolt then verifies again as usual.
    """

    def __init__(self, app: App, signing_secret: str | None = None) -> None:
        super().__init__(app)
        # create_bolt_app always passes one; bolt keeps it (its own check uses the same value).
        found = signing_secret if signing_secret is not None else getattr(app, "_signing_secret", None)
        self.signing_secret = found if isinstance(found, str) and found else None

    async def handle(
        self, req: Request, addition_context_properties: dict[str, Any] | None = None
    ) -> Response:
        if req.method != "POST":
            return await super().handle(req, addition_context_properties)
        if self.signing_secret is not None and not _headers_plausible(
            req.headers.get("x-slack-request-timestamp"), req.headers.get("x-slack-signature"), time.time()
        ):
            # Before a byte of the body is read: no signature, or a timestamp outside the window.
            return _refuse(401, "missing, bad or stale Slack signature", close=True)
        try:
            body = await read_body(req, MAX_BODY_BYTES)
        except BodyTooLarge:
            return _refuse(413, f"body larger than {MAX_BODY_BYTES} bytes", close=True)
        except ValueError as error:
            return _refuse(400, str(error))
        except ClientDisconnect:
            return _refuse(400, "client disconnected")
        if self.signing_secret is not None and not signature_valid(
            self.signing_secret,
            body,
            req.headers.get("x-slack-request-timestamp"),
            req.headers.get("x-slack-signature"),
            time.time(),
        ):
            return _refuse(401, "missing, bad or stale Slack signature")
        try:
            bolt_request = to_bolt_request(req, body, addition_context_properties)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as error:
            # UnicodeDecodeError and JSONDecodeError are ValueErrors; the others come from
            # bolt's context extraction on a body of the wrong shape.
            return _refuse(400, f"unreadable body ({type(error).__name__})")
        problem = payload_problem(bolt_request.body)
        if problem is not None:
            return _refuse(400, f"not a Slack payload: {problem}")
        bolt_response = await run_in_threadpool(self.app.dispatch, bolt_request)
        return to_starlette_response(bolt_response)


def slack_routes(bolt_app: App, path: str = EVENTS_PATH) -> list[Route]:
    """Routes serving the app over HTTP (events, interactivity and the slash command share one URL).

    Pass them to ``bot.web.create_app(..., extra_routes=slack_routes(app))``.
    """
    handler = _ThreadedSlackRequestHandler(bolt_app)

    async def events(request: Request) -> Response:
        return await handler.handle(request)

    return [Route(path, events, methods=["POST"])]


def start_socket_mode(app: App, app_token: str) -> SocketModeHandler:
    """Connect the app to Slack over Socket Mode (no public URL) and return at once.

    Args:
        app: from `create_bolt_app`.
        app_token: the app-level token (``xapp-...``) with ``connections:write``.

    Returns:
        The handler; call ``close()`` on it at shutdown.
    """
    handler = SocketModeHandler(app, app_token)
    handler.connect()  # type: ignore[no-untyped-call]
    return handler
