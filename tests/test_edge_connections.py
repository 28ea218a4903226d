"""Issue 11, finding 1: slow and idle clients cannot starve `replyclock web`.

A real uvicorn server on loopback (bot.web.serve_in_thread, the same settings as `replyclock
web`): 500 connections that send nothing and 100 that trickle a request byte by byte stay open
while /healthz must answer within a second and a signed delivery must be accepted. Then the
request timeout closes them (shortened here so the test takes seconds; 10 s in production), and
a connection over the cap is closed on arrival. The open-file limit is raised to its hard limit
for the 600+ sockets.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette

from bot.core.policy import Policy
from bot.flow.context import AppContext
from bot.web import REQUEST_TIMEOUT, GuardedH11Protocol, create_app, limit_repeated_logs, serve_in_thread
from tests.test_webhook import delivery, encode, signed, webhook_connectors, webhook_policy

IDLE, SLOW = 500, 100


@pytest.fixture
def policy() -> Policy:
    return webhook_policy()


@pytest.fixture(autouse=True)
def enough_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if wanted < 2 * (IDLE + SLOW) + 200:
        pytest.skip(f"the open-file hard limit ({hard}) is too low for {IDLE + SLOW} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def app(ctx: AppContext, policy: Policy) -> Starlette:
    return create_app(ctx, webhook_connectors(policy))


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_healthz_and_webhooks_stay_fast_under_idle_and_slow_clients(
    app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert REQUEST_TIMEOUT <= 30  # the production setting: slow or idle clients closed within 30 s
    monkeypatch.setattr(GuardedH11Protocol, "request_timeout", 4.0)
    sockets: list[socket.socket] = []
    stop = threading.Event()
    with serve_in_thread(app) as base:
        try:
            idle = [_connect(base) for _ in range(IDLE)]
            slow = [_connect(base) for _ in range(SLOW)]
            sockets = idle + slow
            body = encode(delivery(id="slow-body"))
            for index, sock in enumerate(slow):
                if index % 2:  # half never finish their headers
                    sock.sendall(b"POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                else:  # half send valid signed headers, then the body a byte at a time
                    head = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items())
                    sock.sendall(
                        f"POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode()
                    )

            def trickle() -> None:
                while not stop.wait(0.5):
                    for index, sock in enumerate(slow):
                        with contextlib.suppress(OSError):
                            sock.send(b"a" if index % 2 else body[:1])

            trickler = threading.Thread(target=trickle, daemon=True)
            trickler.start()
            time.sleep(0.5)  # every connection is in
            with httpx.Client(base_url=base, timeout=5) as http:
                started = time.monotonic()
                health = http.get("/healthz")
                health_seconds = time.monotonic() - started
                hook_body = encode(delivery(id="in-the-storm"))
                started = time.monotonic()
                accepted = http.post("/hooks/shop", content=hook_body, headers=signed(hook_body))
                hook_seconds = time.monotonic() - started
            print(f"/healthz {health_seconds * 1000:.0f} ms, webhook {hook_seconds * 1000:.0f} ms")
            assert health.status_code == 200 and health_seconds <= 1.0, health_seconds
            assert accepted.status_code == 202 and hook_seconds <= 1.0, hook_seconds
            # The request timeout closes idle, half-header and slow-body connections alike.
            deadline = time.monotonic() + 4.0 + 3.0
            for sock in (idle[0], idle[-1], slow[0], slow[1], slow[-1]):
                assert _closed_by_server(sock, max(deadline - time.monotonic(), 0.1))
        finally:
            stop.set()
            for sock in sockets:
                sock.close()


def test_a_connection_over_the_cap_is_closed_on_arrival(
    app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GuardedH11Protocol, "max_connections", 20)
    with serve_in_thread(app) as base:
        held = [_connect(base) for _ in range(20)]
        try:
            time.sleep(0.2)
            extra = _connect(base)
            assert _closed_by_server(extra, 2.0)
            extra.close()
            held.pop().close()
            time.sleep(0.2)
            with httpx.Client(base_url=base, timeout=5) as http:  # room again
                assert http.get("/healthz").status_code == 200
        finally:
            for sock in held:
                sock.close()


# --- finding 7: no redirect ever echoes the Host header ----------------------------------------


@pytest.mark.parametrize("path", ["/hooks/shop%2f", "/hooks/shop/", "/healthz/", "/metrics/"])
def test_no_redirect_echoes_the_host_header(app: Starlette, path: str) -> None:
    with serve_in_thread(app) as base:
        sock = _connect(base)
        try:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode()
            )
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        finally:
            sock.close()
    status = answer.split(b"\r\n", 1)[0]
    assert not status.startswith((b"HTTP/1.1 30", b"HTTP/1.1 307", b"HTTP/1.1 308")), answer
    assert b"evil.example" not in answer


def test_a_flood_of_accept_errors_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Finding 1: asyncio logged ``socket.accept() out of system resource`` ~12,500 times a second."""
    limit_repeated_logs()
    logger = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(5_000):
            logger.error("socket.accept() out of system resource")
        logger.error("something else")
    lines = [record.getMessage() for record in caplog.records if record.name == "asyncio"]
    assert lines == ["socket.accept() out of system resource", "something else"]
