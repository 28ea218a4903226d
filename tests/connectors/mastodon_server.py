"""A loopback Mastodon for the connector tests, built from real recorded responses.

The recorded cassettes (Mastodon.py's own test suite, recorded against a real Mastodon on
localhost:3000, MIT licence) are read as they are; this module only parses the few
fields it needs out of them (the cassettes are plain vcrpy YAML, and PyYAML is not a
dependency, so `recorded_bodies` reads their single-quoted scalars itself).

`MastodonStandIn` serves, on 127.0.0.1 with a free port:
- ``GET /api/v1/notifications`` with Mastodon's id pagination (``min_id``, ``since_id``,
  ``max_id``, ``limit``, ``types[]``, ``exclude_types[]``) and its ``Link`` header;
- ``GET /api/v1/statuses/:id``;
- ``POST /api/v1/statuses`` (form or JSON), answering with a status shaped like the
  recorded reply, written by our own account;
- ``GET /api/v1/instance`` and ``GET /api/v1/accounts/verify_credentials``, should the client ask;
- scripted failures (`fail`), e.g. 429 with Mastodon's rate-limit headers, 401, 422, 500.

Every request is recorded (`requests`) so a test can check what the real client sent.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

# The recorded cassettes: beside the tests when copied there, else the shared fixtures.
_CASSETTE_DIRS = (
    Path(__file__).parent / "cassettes" / "mastodon",
    Path(os.environ.get("REPLYCLOCK_FIXTURES", "/work/shared/fixtures")) / "mastodon",
)


def cassette_path(name: str) -> Path:
    """Where the recorded cassette `name` lives."""
    for folder in _CASSETTE_DIRS:
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"recorded cassette {name} not found in {', '.join(map(str, _CASSETTE_DIRS))}")


@dataclass(frozen=True)
class RecordedInteraction:
    method: str
    uri: str
    status: int
    body: str
    headers: Mapping[str, str]


def _single_quoted(text: str, start: int) -> tuple[str, int]:
    """A YAML single-quoted flow scalar beginning at text[start] == "'": its value and end."""
    assert text[start] == "'"
    pieces: list[str] = []
    index = start + 1
    while True:
        quote = text.index("'", index)
        if text.startswith("''", quote):
            pieces.append(text[index:quote] + "'")
            index = quote + 2
            continue
        pieces.append(text[index:quote])
        raw = "".join(pieces)
        # Line folding: a single line break (with indentation) is a space, an empty line a newline.
        lines = raw.split("\n")
        folded = lines[0].rstrip(" ")
        blanks = 0
        for line in lines[1:]:
            stripped = line.strip(" ")
            if not stripped:
                blanks += 1
                continue
            folded += ("\n" * blanks if blanks else " ") + stripped
            blanks = 0
        return folded, quote + 1


def recorded_interactions(name: str) -> list[RecordedInteraction]:
    """The request method, URI, response status, body and headers of each recorded interaction."""
    return list(_read_cassette(name))


@functools.cache
def _read_cassette(name: str) -> tuple[RecordedInteraction, ...]:
    text = cassette_path(name).read_text()
    found: list[RecordedInteraction] = []
    for chunk in re.split(r"^- request:\n", text, flags=re.M)[1:]:
        method = re.search(r"^    method: (\S+)", chunk, re.M)
        uri = re.search(r"^    uri: (\S+)", chunk, re.M)
        code = re.search(r"^      code: (\d+)", chunk, re.M)
        response = chunk.index("  response:\n")
        body_at = chunk.index("string: ", response) + len("string: ")
        body, _end = _single_quoted(chunk, body_at)
        headers: dict[str, str] = {}
        header_block = chunk[chunk.index("    headers:\n", response) :]
        for match in re.finditer(r"^      ([a-z0-9-]+):\n      - '?([^'\n]*)'?$", header_block, re.M):
            headers[match.group(1)] = match.group(2)
        assert method and uri and code
        found.append(RecordedInteraction(method.group(1), uri.group(1), int(code.group(1)), body, headers))
    return tuple(found)


def _recorded(name: str, method: str, uri_suffix: str, index: int = 0) -> RecordedInteraction:
    matches = [i for i in recorded_interactions(name) if i.method == method and i.uri.endswith(uri_suffix)]
    return matches[index]


def recorded_mention_notification() -> dict[str, Any]:
    """The real mention notification (GET /api/v1/notifications?types[]=mention)."""
    interaction = _recorded(
        "test_notifications_mentions_only.yaml", "GET", "/api/v1/notifications?types%5B%5D=mention"
    )
    notifications = json.loads(interaction.body)
    assert isinstance(notifications, list) and len(notifications) == 1
    return dict(notifications[0])


def recorded_notifications_headers() -> Mapping[str, str]:
    return _recorded(
        "test_notifications_mentions_only.yaml", "GET", "/api/v1/notifications?types%5B%5D=mention"
    ).headers


def recorded_reply_status() -> dict[str, Any]:
    """The real status posted with in_reply_to_id (POST /api/v1/statuses, second call)."""
    return dict(json.loads(_recorded("test_status_reply.yaml", "POST", "/api/v1/statuses", index=1).body))


def recorded_plain_status() -> dict[str, Any]:
    """The real top-level status of the reply cassette ("Toot, finally!")."""
    return dict(json.loads(_recorded("test_status_reply.yaml", "POST", "/api/v1/statuses", index=0).body))


@dataclass
class RecordedRequest:
    """One request the client made."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class Failure:
    """A scripted error answer for the next `times` requests matching method and path prefix."""

    method: str
    path: str
    status: int
    body: Any
    headers: Mapping[str, str]
    times: int = 1


def _id_key(value: str) -> tuple[int, str]:
    return (len(value), value)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class MastodonStandIn:
    """The loopback server and its state. Use as a context manager."""

    own_account: dict[str, Any] = field(default_factory=dict)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    max_limit: int = 80
    honour_types: bool = True  # False: behave like servers older than 3.5, which ignore types[]
    honour_min_id: bool = True  # False: a server that ignores min_id and answers the newest page
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_status: int = 117020600000000000
    _idempotency: dict[str, str] = field(default_factory=dict)

    # -- state -------------------------------------------------------------------------------------

    def add_status(self, status: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(status))
        self.statuses[str(stored["id"])] = stored
        return stored

    def add_notification(self, notification: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(notification))
        if stored.get("status"):
            self.add_status(stored["status"])
        self.notifications.append(stored)
        return stored

    def mention(
        self,
        notification_id: str,
        status_id: str,
        html: str,
        *,
        account: Mapping[str, Any] | None = None,
        at: datetime | None = None,
        in_reply_to_id: str | None = None,
        visibility: str = "public",
        **extra: Any,
    ) -> dict[str, Any]:
        """A mention notification modelled on the recorded one, with its own ids and text."""
        template = recorded_mention_notification()
        status = dict(template["status"])
        author = dict(account) if account is not None else dict(status["account"])
        created = at or datetime.now(UTC)
        in_reply_to = self.statuses.get(in_reply_to_id) if in_reply_to_id else None
        status.update(
            id=status_id,
            created_at=_iso(created),
            content=html,
            visibility=visibility,
            in_reply_to_id=in_reply_to_id,
            in_reply_to_account_id=in_reply_to["account"]["id"] if in_reply_to else None,
            url=f"{author['url']}/{status_id}",
            uri=f"{author['uri']}/statuses/{status_id}",
            account=author,
        )
        status.update(extra)
        notification = dict(template)
        notification.update(
            id=notification_id,
            created_at=_iso(created + timedelta(milliseconds=635)),
            group_key=f"ungrouped-{notification_id}",
            account=author,
            status=status,
        )
        return self.add_notification(notification)

    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        error: str = "error",
        headers: Mapping[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests to `method path*` with an error."""
        self.failures.append(Failure(method, path, status, {"error": error}, dict(headers or {}), times))

    def answer_raw(self, method: str, path: str, body: Any, *, times: int = 1) -> None:
        """Answer the next `times` requests to `method path*` with 200 and `body`, whatever its shape."""
        self.failures.append(Failure(method, path, 200, body, {}, times))

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path]

    @property
    def base_url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> MastodonStandIn:
        handler = _make_handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="mastodon-stand-in", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- the API -----------------------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(request)
            for failure in self.failures:
                if (
                    failure.times > 0
                    and failure.method == request.method
                    and request.path.startswith(failure.path)
                ):
                    failure.times -= 1
                    return failure.status, failure.body, dict(failure.headers)
            if request.method == "GET" and request.path == "/api/v1/notifications":
                return self._notifications(request)
            match = re.fullmatch(r"/api/v1/notifications/(\w+)", request.path)
            if request.method == "GET" and match:
                found = [n for n in self.notifications if n["id"] == match.group(1)]
                return (200, found[0], {}) if found else (404, {"error": "Record not found"}, {})
            match = re.fullmatch(r"/api/v1/statuses/(\w+)", request.path)
            if request.method == "GET" and match:
                status = self.statuses.get(match.group(1))
                return (200, status, {}) if status else (404, {"error": "Record not found"}, {})
            if request.method == "POST" and request.path == "/api/v1/statuses":
                return self._post_status(request)
            if request.method == "GET" and request.path == "/api/v1/accounts/verify_credentials":
                return 200, self.own_account, {}
            if request.method == "GET" and request.path in ("/api/v1/instance", "/api/v2/instance"):
                return 200, {"uri": "localhost:3000", "title": "Mastodon", "version": "4.5.0"}, {}
            return 404, {"error": "Endpoint not found"}, {}

    def _notifications(self, request: RecordedRequest) -> tuple[int, Any, dict[str, str]]:
        query = request.query
        types = set(query.get("types[]", [])) if self.honour_types else set()
        excluded = set(query.get("exclude_types[]", []))
        limit = min(int(query.get("limit", ["40"])[0]), self.max_limit)
        chosen = [
            n for n in self.notifications if (not types or n["type"] in types) and n["type"] not in excluded
        ]
        chosen.sort(key=lambda n: _id_key(n["id"]), reverse=True)  # newest first, as Mastodon answers
        if "max_id" in query:
            chosen = [n for n in chosen if _id_key(n["id"]) < _id_key(query["max_id"][0])]
        if "since_id" in query:
            chosen = [n for n in chosen if _id_key(n["id"]) > _id_key(query["since_id"][0])]
        if "min_id" in query and self.honour_min_id:
            # The page immediately newer than min_id: the oldest `limit` of them, still newest first.
            chosen = [n for n in chosen if _id_key(n["id"]) > _id_key(query["min_id"][0])]
            chosen = chosen[-limit:]
        else:
            chosen = chosen[:limit]
        headers: dict[str, str] = {}
        if chosen:
            keep = {k: v for k, v in query.items() if k in ("types[]", "exclude_types[]")}
            older = urlencode([("max_id", chosen[-1]["id"]), *[(k, v) for k, vs in keep.items() for v in vs]])
            newer = urlencode([("min_id", chosen[0]["id"]), *[(k, v) for k, vs in keep.items() for v in vs]])
            headers["Link"] = (
                f'<{self.base_url}/api/v1/notifications?{older}>; rel="next", '
                f'<{self.base_url}/api/v1/notifications?{newer}>; rel="prev"'
            )
        return 200, chosen, headers

    def _post_status(self, request: RecordedRequest) -> tuple[int, Any, dict[str, str]]:
        form = request.form
        text = form.get("status", [""])[0]
        if not text.strip():
            return 422, {"error": "Validation failed: Text can't be blank"}, {}
        key = request.headers.get("idempotency-key")
        if key and key in self._idempotency:
            return 200, self.statuses[self._idempotency[key]], {}
        in_reply_to_id = form.get("in_reply_to_id", [None])[0]
        parent = self.statuses.get(in_reply_to_id) if in_reply_to_id else None
        if in_reply_to_id and parent is None:
            return 404, {"error": "Record not found"}, {}
        self._next_status += 1
        status_id = str(self._next_status)
        status = recorded_reply_status()
        mentioned = [m.group(1) for m in re.finditer(r"(?<![\w@])@([\w.]+(?:@[\w.-]+\w)?)", text)]
        status.update(
            id=status_id,
            created_at=_iso(datetime.now(UTC)),
            in_reply_to_id=in_reply_to_id,
            in_reply_to_account_id=parent["account"]["id"] if parent else None,
            visibility=form.get("visibility", ["public"])[0],
            content="<p>" + _escape(text).replace("\n", "<br />") + "</p>",
            account=self.own_account,
            url=f"{self.own_account['url']}/{status_id}",
            uri=f"{self.own_account['uri']}/statuses/{status_id}",
            mentions=[{"acct": acct, "username": acct.split("@")[0]} for acct in mentioned],
        )
        self.statuses[status_id] = status
        if key:
            self._idempotency[key] = status_id
        return 200, status, {}


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def own_account_from_recording() -> dict[str, Any]:
    """Our account: the one the recorded mention mentions (mastodonpy_test), shaped like a real account."""
    notification = recorded_mention_notification()
    mentioned = notification["status"]["mentions"][0]
    account = dict(notification["account"])
    account.update(
        id=mentioned["id"],
        username=mentioned["username"],
        acct=mentioned["acct"],
        url=mentioned["url"],
        uri=f"http://localhost:3000/ap/users/{mentioned['id']}",
        display_name="Acme Support",
        roles=[],
    )
    return account


def _make_handler(stand_in: MastodonStandIn) -> type[BaseHTTPRequestHandler]:
    recorded_headers = recorded_notifications_headers()

    class Handler(BaseHTTPRequestHandler):
        server_version = "Mastodon-stand-in"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if raw and (self.headers.get("Content-Type") or "").startswith("application/json"):
                form = {k: v if isinstance(v, list) else [str(v)] for k, v in json.loads(raw).items()}
            else:
                form = parse_qs(raw.decode(), keep_blank_values=True)
            request = RecordedRequest(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query, keep_blank_values=True),
                form=form,
                headers={k.lower(): v for k, v in self.headers.items()},
            )
            status, payload, headers = stand_in.handle(request)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            # Mastodon's rate-limit headers on every answer (values as recorded, reset in the future).
            merged = {
                "X-RateLimit-Limit": recorded_headers.get("x-ratelimit-limit", "300"),
                "X-RateLimit-Remaining": recorded_headers.get("x-ratelimit-remaining", "299"),
                "X-RateLimit-Reset": _iso(datetime.now(UTC) + timedelta(minutes=5)),
                "X-Request-Id": recorded_headers.get("x-request-id", ""),
            }
            merged.update(headers)
            for name, value in merged.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = _serve
        do_POST = _serve
        do_PUT = _serve
        do_DELETE = _serve

    return Handler
