"""A loopback stand-in for a Bluesky PDS/AppView, answering the real atproto SDK over HTTP.

It serves the XRPC methods the connector uses, with bodies shaped as the published lexicons
define them; the payloads are recorded in tests/connectors/bluesky/*.json:

    com.atproto.server.createSession      (createSession.json; 401 AuthenticationRequired on a bad password)
    com.atproto.server.refreshSession     (refreshSession.json; rotates the refresh token, the old one dies)
    app.bsky.actor.getProfile             (getProfile.json)
    app.bsky.notification.listNotifications  (notifications.json, newest first, paged by opaque cursors)
    com.atproto.repo.createRecord         (createRecord.json)

Tokens are JWTs (header.payload.signature, base64url) with ``sub``, ``iat`` and ``exp``, so the
SDK's own expiry check decides when to refresh; ``access_ttl`` makes them short-lived.
``fail_next[method]`` queues error answers (rateLimited.json and the like) for a method.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

FIXTURES = Path(__file__).parent / "bluesky"
OUR_DID = "did:plc:acmesupport0000000000000"
OUR_HANDLE = "acme.bsky.social"
APP_PASSWORD = "abcd-efgh-ijkl-mnop"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(sub: str, scope: str, ttl: float) -> str:
    now = int(time.time())
    header = {"typ": "at+jwt" if scope != "com.atproto.refresh" else "refresh+jwt", "alg": "ES256K"}
    payload = {"scope": scope, "sub": sub, "iat": now, "exp": now + int(ttl), "aud": "did:web:stand-in"}
    if scope == "com.atproto.refresh":
        payload["jti"] = secrets.token_urlsafe(16)
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(secrets.token_bytes(64)))
    )


class Request:
    def __init__(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: Any
    ):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body


class BlueskyStandIn:
    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []  # newest first
        self.records: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.fail_next: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.access_ttl = 7200.0
        self.refresh_ttl = 90 * 86400.0
        self.access_tokens: set[str] = set()
        self.refresh_tokens: set[str] = set()
        self.page_size_cap = 100
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stand_in._handle(self, "GET")

            def do_POST(self) -> None:
                stand_in._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- state --

    def add(self, notification: dict[str, Any]) -> None:
        """A new notification (it becomes the newest)."""
        with self.lock:
            self.notifications.insert(0, notification)

    def calls(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/xrpc/{method}"]

    def _session(self) -> dict[str, Any]:
        access = jwt(OUR_DID, "com.atproto.appPass", self.access_ttl)
        refresh = jwt(OUR_DID, "com.atproto.refresh", self.refresh_ttl)
        self.access_tokens.add(access)
        self.refresh_tokens.add(refresh)
        return {"accessJwt": access, "refreshJwt": refresh}

    # -- HTTP --

    def _handle(self, http: BaseHTTPRequestHandler, verb: str) -> None:
        url = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        request = Request(
            verb, url.path, parse_qs(url.query), {k.lower(): v for k, v in http.headers.items()}, body
        )
        with self.lock:
            self.requests.append(request)
            status, headers, payload = self._answer(request)
        data = json.dumps(payload).encode()
        http.send_response(status)
        http.send_header("Content-Type", "application/json; charset=utf-8")
        http.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            http.send_header(name, value)
        http.end_headers()
        http.wfile.write(data)

    def _bearer(self, request: Request) -> str | None:
        value = request.headers.get("authorization", "")
        return value[7:] if value.startswith("Bearer ") else None

    def _answer(self, request: Request) -> tuple[int, dict[str, str], Any]:
        method = request.path.removeprefix("/xrpc/")
        queued = self.fail_next.get(method)
        if queued:
            failure = queued.pop(0)
            return int(failure["status"]), dict(failure.get("headers", {})), failure["body"]
        if method == "com.atproto.server.createSession":
            body = request.body or {}
            if body.get("identifier") not in (OUR_HANDLE, OUR_DID) or body.get("password") != APP_PASSWORD:
                failure = fixture("authFactorOrWrongPassword.json")
                return failure["status"], {}, failure["body"]
            return 200, {}, {**fixture("createSession.json"), **self._session()}
        if method == "com.atproto.server.refreshSession":
            token = self._bearer(request)
            if token not in self.refresh_tokens:
                failure = fixture("expiredToken.json")
                return failure["status"], {}, failure["body"]
            self.refresh_tokens.discard(token)  # rotated: a refresh token works once
            return 200, {}, {**fixture("refreshSession.json"), **self._session()}
        if self._bearer(request) not in self.access_tokens:
            failure = fixture("expiredToken.json")
            return failure["status"], {}, failure["body"]
        if method == "app.bsky.actor.getProfile":
            return 200, {}, fixture("getProfile.json")
        if method == "app.bsky.notification.listNotifications":
            limit = min(int(request.query.get("limit", ["50"])[0]), self.page_size_cap)
            start = int(base64.b64decode(request.query["cursor"][0])) if "cursor" in request.query else 0
            page = self.notifications[start : start + limit]
            answer: dict[str, Any] = {"notifications": copy.deepcopy(page), "priority": False}
            if start + limit < len(self.notifications):
                answer["cursor"] = base64.b64encode(str(start + limit).encode()).decode()
            answer["seenAt"] = "2026-11-23T07:00:00.000Z"
            return 200, {}, answer
        if method == "com.atproto.repo.createRecord":
            body = request.body or {}
            rkey = "3lcq" + secrets.token_hex(5)
            uri = f"at://{body.get('repo')}/{body.get('collection')}/{rkey}"
            self.records[uri] = body.get("record")
            return 200, {}, {**fixture("createRecord.json"), "uri": uri}
        return 501, {}, {"error": "MethodNotImplemented", "message": f"{method} is not served here"}

    def __enter__(self) -> BlueskyStandIn:
        self.thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
