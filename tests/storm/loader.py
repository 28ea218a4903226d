"""The load generator: the schedule's deliveries POSTed, signed, by a fixed number of workers.

Each worker takes the next delivery, waits until it is due (an open-loop schedule: when the
server falls behind, the workers send as fast as they can, never more than `concurrency` at
once) and POSTs it over its own keep-alive connection. A 5xx answer or a broken connection is
retried after a short pause, as a webhook sender does (deliveries are idempotent).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from tests.storm.scenario import Delivery, sign

MAX_TRIES = 20
RETRY_PAUSE = 0.5


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery."""

    delivery: Delivery
    sent: float  # time.time() when the (last) request was sent
    done: float  # time.time() when its answer arrived
    status: int  # 0: no answer after MAX_TRIES
    duplicate: bool | None  # the answer's "duplicate"
    conversation_id: int | None
    tries: int


class _Client:
    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.connection: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            self.connection.request("POST", path, body=body, headers=headers)
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_load(
    base_url: str,
    account: str,
    secret: str,
    deliveries: Sequence[Delivery],
    *,
    start: float,
    concurrency: int,
) -> list[Outcome]:
    """Send every delivery at `start` + its `at` (time.time() seconds); returns the outcomes in schedule order."""
    outcomes: list[Outcome | None] = [None] * len(deliveries)
    lock = threading.Lock()
    position = 0
    path = f"/hooks/{account}"

    def work() -> None:
        nonlocal position
        client = _Client(base_url)
        try:
            while True:
                with lock:
                    index = position
                    position += 1
                if index >= len(deliveries):
                    return
                delivery = deliveries[index]
                wait = start + delivery.at - time.time()
                if wait > 0:
                    time.sleep(wait)
                headers = {
                    "Content-Type": "application/json",
                    "X-Replyclock-Signature": sign(secret, delivery.body),
                }
                status, answer, sent, tries = 0, b"", time.time(), 0
                while tries < MAX_TRIES:
                    tries += 1
                    sent = time.time()
                    try:
                        status, answer = client.post(path, delivery.body, headers)
                    except (OSError, http.client.HTTPException):
                        status = 0
                    if status and status < 500:
                        break
                    time.sleep(RETRY_PAUSE)
                done = time.time()
                duplicate: bool | None = None
                conversation_id: int | None = None
                if status == 202:
                    data = json.loads(answer)
                    duplicate = bool(data.get("duplicate"))
                    found = data.get("conversation_id")
                    conversation_id = found if isinstance(found, int) else None
                outcomes[index] = Outcome(delivery, sent, done, status, duplicate, conversation_id, tries)
        finally:
            client.close()

    workers = [threading.Thread(target=work, name=f"load-{n}", daemon=True) for n in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [outcome for outcome in outcomes if outcome is not None]
