"""The endpoint the storm's acknowledgements go to: the webhook account's `reply_url`.

`ReplyRecorder` is a small HTTP server on 127.0.0.1 that checks each reply's signature (as a
real receiving system would), records it with the time it arrived, and answers with an id,
as `connectors.webhook.WebhookConnector.reply` expects.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from connectors.webhook import SIGNATURE_HEADER, verify_signature


@dataclass(frozen=True)
class Reply:
    """One reply POSTed by a `run` process."""

    id: str
    in_reply_to: str | None
    thread_id: str | None
    author_id: str | None
    text: str
    timestamp: float


class ReplyRecorder:
    """Receives `reply_url` POSTs; `replies` lists them; bad signatures are counted and refused."""

    def __init__(self, secret: str, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.host = host
        self.replies: list[Reply] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ReplyRecorder is not running")
        return f"http://{self.host}:{self._server.server_port}/replies"

    def _receive(self, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
        if not verify_signature(self.secret, body, signature):
            with self._lock:
                self.refused += 1
            return 401, {"error": "bad signature"}
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {"error": "bad json"}
        with self._lock:
            reply = Reply(
                id=f"r{len(self.replies) + 1}",
                in_reply_to=data.get("in_reply_to"),
                thread_id=data.get("thread_id"),
                author_id=data.get("author_id"),
                text=str(data.get("text", "")),
                timestamp=time.time(),
            )
            self.replies.append(reply)
        return 200, {"id": reply.id}

    def start(self) -> Self:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, answer = recorder._receive(body, self.headers.get(SIGNATURE_HEADER))
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="reply-recorder", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
