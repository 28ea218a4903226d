"""A loopback stand-in for the X API v2, serving the real responses recorded in shared/fixtures/x.

`XServer` runs `http.server` on 127.0.0.1:<free port> in a thread and records every request.
What it answers:

- ``GET /2/users/:id/mentions``: the recorded cassette response (exact gzip body and headers), or,
  once `XServer.timeline` is set, pages cut from a list of tweets the way X cuts them: newest
  first, ``since_id`` honoured, ``max_results`` per page, an opaque ``next_token`` bound to the
  position (new tweets do not shift later pages), only the requested ``tweet.fields`` and, with
  ``expansions=author_id``, ``includes.users``; the shapes are those of the recorded responses.
- ``POST /2/tweets``: the recorded 201 body (``data.id``, ``data.text``), the first time with
  the recorded id, then with the next ids, echoing the text posted.
- anything scripted with `XServer.script` first: recorded errors (429 with ``x-rate-limit-*``
  headers, 401, 403 from the Postman collection) or made-up ones.

The cassettes are vcrpy YAML with gzip+base64 ``!!binary`` bodies. PyYAML is not a dependency of
the project, so `load_yaml` reads the small subset of YAML those files use.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The recorded traffic: $REPLYCLOCK_FIXTURES/x, else shared/ beside the checkout (as in CI), else /work/shared.
_FIXTURE_DIRS = [
    Path(os.environ["REPLYCLOCK_FIXTURES"]) / "x" if os.environ.get("REPLYCLOCK_FIXTURES") else None,
    Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "x",
    Path("/work/shared/fixtures/x"),
]
FIXTURES = next((d for d in _FIXTURE_DIRS if d is not None and d.is_dir()), Path("/work/shared/fixtures/x"))
MENTIONS_CASSETTE = FIXTURES / "test_client_get_users_mentions.yaml"
CREATE_CASSETTE = FIXTURES / "test_client_create_and_delete_tweet.yaml"
POSTMAN = FIXTURES / "postman_twitter_api_v2.collection.json"
RECORDED_USER_ID = "783214"  # the account whose mentions the cassette holds
RECORDED_TWEET_ID = "1456012973835788293"  # the id POST /2/tweets answered in the cassette
# The credentials' environment of an X connector talking to this server (made-up values).
ENV = {
    "X_BEARER_TOKEN": "AAAA-test-bearer-0123456789",
    "X_CONSUMER_KEY": "test-consumer-key",
    "X_CONSUMER_SECRET": "test-consumer-secret",
    "X_ACCESS_TOKEN": "783214-test-access-token",
    "X_ACCESS_TOKEN_SECRET": "test-access-token-secret",
}
# Headers a replay must not copy: cookies for twitter.com, and lengths we recompute.
DROPPED_HEADERS = {"set-cookie", "content-length", "transfer-encoding", "connection"}
DEFAULT_TWEET_FIELDS = ("id", "text", "edit_history_tweet_ids")
DEFAULT_USER_FIELDS = ("id", "name", "username")


# -- a reader for the YAML of vcrpy cassettes -------------------------------------------------------

_KEY = re.compile(r"([^\s'\"-][^:]*?|-[^\s][^:]*?):(?: +(.*))?$")


def load_yaml(text: str) -> Any:
    """Parse the block-style YAML subset that vcrpy writes.

    Mappings, sequences (also ``- key: value`` items and sequences level with their key), plain
    and single-quoted scalars folded over several lines, ``null``, integers and ``!!binary |``.
    """
    lines = [
        (len(raw) - len(raw.lstrip(" ")), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.lstrip().startswith("#")
    ]
    value, end = _block(lines, 0, lines[0][0] if lines else 0)
    if end != len(lines):
        raise ValueError(f"unparsed YAML from line {end}: {lines[end][1]!r}")
    return value


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _sequence(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
        rest = lines[i][1][2:].strip()
        if rest and _KEY.match(rest) and not rest.startswith("'"):
            lines[i] = (indent + 2, rest)  # "- key: value" opens a mapping two columns in
            value, i = _mapping(lines, i, indent + 2)
        elif rest:
            value, i = _scalar(lines, i, rest, indent)
        else:
            value, i = _block(lines, i + 1, lines[i + 1][0])
        items.append(value)
    return items, i


def _mapping(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
        match = _KEY.match(lines[i][1])
        if match is None:
            raise ValueError(f"expected 'key: value' in YAML, got {lines[i][1]!r}")
        key, rest = match.group(1).strip(), (match.group(2) or "").strip()
        if rest.startswith("!!binary"):
            j = i + 1
            chunks = []
            while j < len(lines) and lines[j][0] > indent:
                chunks.append(lines[j][1])
                j += 1
            result[key], i = base64.b64decode("".join(chunks)), j
        elif rest:
            result[key], i = _scalar(lines, i, rest, indent)
        elif i + 1 < len(lines) and (
            lines[i + 1][0] > indent or (lines[i + 1][0] == indent and lines[i + 1][1].startswith("- "))
        ):
            result[key], i = _block(lines, i + 1, lines[i + 1][0])
        else:
            result[key], i = None, i + 1
    return result, i


def _scalar(lines: list[tuple[int, str]], i: int, first: str, indent: int) -> tuple[Any, int]:
    """A scalar starting on line i, folded with the more indented lines that continue it."""
    parts = [first]
    i += 1
    quoted = first.startswith("'")
    while i < len(lines) and lines[i][0] > indent:
        if quoted and _closed(" ".join(parts)):
            break
        parts.append(lines[i][1])
        i += 1
    text = " ".join(parts)
    if quoted:
        return text[1:-1].replace("''", "'"), i
    if text in ("null", "~"):
        return None, i
    if text in ("true", "false"):
        return text == "true", i
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text), i
    return text, i


def _closed(text: str) -> bool:
    body = text[1:].replace("''", "")
    return body.endswith("'")


# -- recorded responses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One HTTP response to send."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def json(self) -> Any:
        body = gzip.decompress(self.body) if self.header("content-encoding") == "gzip" else self.body
        return json.loads(body)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def with_headers(self, **changes: str) -> Reply:
        """A copy with headers replaced (``x_rate_limit_reset="..."`` sets ``x-rate-limit-reset``)."""
        names = {key.replace("_", "-").lower(): value for key, value in changes.items()}
        kept = tuple((k, v) for k, v in self.headers if k.lower() not in names)
        return Reply(self.status, self.reason, kept + tuple(names.items()), self.body)


def recorded(path: Path, method: str, path_prefix: str) -> Reply:
    """The recorded response of the first interaction of `method` on a path starting with `path_prefix`."""
    cassette = load_yaml(path.read_text())
    for interaction in cassette["interactions"]:
        request, response = interaction["request"], interaction["response"]
        if request["method"] == method and urlsplit(request["uri"]).path.startswith(path_prefix):
            headers = tuple(
                (name, str(value))
                for name, values in response["headers"].items()
                if name.lower() not in DROPPED_HEADERS
                for value in values
            )
            return Reply(
                response["status"]["code"], response["status"]["message"], headers, response["body"]["string"]
            )
    raise LookupError(f"no {method} {path_prefix} in {path.name}")


def recorded_mentions() -> Reply:
    """``GET /2/users/783214/mentions`` as tweepy's test suite recorded it: 10 mentions and a next_token."""
    return recorded(MENTIONS_CASSETTE, "GET", "/2/users/")


def recorded_created_tweet() -> Reply:
    """``POST /2/tweets`` as recorded: 201 with ``{"data": {"id": ..., "text": "Test Tweet"}}``."""
    return recorded(CREATE_CASSETTE, "POST", "/2/tweets")


def postman_example(request_name: str, response_name: str) -> Reply:
    """A saved example response of the X Postman collection (its JSON served gzip-compressed as X does)."""
    collection = json.loads(POSTMAN.read_text())
    for item in _walk(collection["item"]):
        if item["name"] != request_name:
            continue
        for example in item.get("response", []):
            if example.get("name") == response_name:
                body = (example.get("body") or "").encode()
                headers = tuple(
                    (h["key"], h["value"])
                    for h in example.get("header") or []
                    if h["key"].lower() not in DROPPED_HEADERS
                )
                if dict(headers).get("content-encoding") == "gzip":
                    body = gzip.compress(body)
                return Reply(example["code"], example.get("status", ""), headers, body)
    raise LookupError(f"no Postman example {request_name!r} / {response_name!r}")


def _walk(items: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for item in items:
        if "item" in item:
            yield from _walk(item["item"])
        else:
            yield item


def postman_rate_limited() -> Reply:
    """The collection's recorded 429: ``Rate limit exceeded`` with ``x-rate-limit-reset: 1593185073``."""
    return postman_example("Single Tweet", "429 Rate Limit Exceeded")


def postman_unauthorized() -> Reply:
    """The collection's recorded 401 (``{"title": "Unauthorized", ...}``)."""
    return postman_example("Retrieve Rules", "401 Unauthorized")


def postman_client_forbidden() -> Reply:
    """The collection's recorded 403 ``client-not-enrolled``."""
    return postman_example("Retrieve Rules", "403 Forbidden - Client Not Enrolled")


def postman_expanded_users() -> dict[str, Any]:
    """Recent search with tweet.fields, ``expansions=author_id`` and ``includes.users``: the full shapes."""
    reply = postman_example("Recent search", "200 Success - Request Tweet Fields with Expanded User Fields")
    payload: dict[str, Any] = reply.json()
    return payload


def json_reply(status: int, reason: str, payload: Any, **headers: str) -> Reply:
    """A made-up response in X's style (JSON, gzip, the recorded header set)."""
    body = gzip.compress(json.dumps(payload).encode())
    base = (("content-type", "application/json; charset=utf-8"), ("content-encoding", "gzip"))
    return Reply(status, reason, base, body).with_headers(**headers)


def problem(status: int, title: str, detail: str, **headers: str) -> Reply:
    """An API v2 problem response, shaped like the collection's 401: title, type, status, detail."""
    return json_reply(
        status, title, {"title": title, "type": "about:blank", "status": status, "detail": detail}, **headers
    )


# -- tweets shaped like the recorded ones -------------------------------------------------------------


def snowflake_created_at(tweet_id: str) -> str:
    """``created_at`` as X writes it (``2020-06-24T17:19:07.000Z``), from the id's timestamp."""
    at = datetime.fromtimestamp(((int(tweet_id) >> 22) + 1288834974657) / 1000, tz=UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def user(user_id: str, username: str, name: str) -> dict[str, str]:
    """A user object as in ``includes.users`` of the collection (id, name, username)."""
    return {"id": user_id, "name": name, "username": username}


def tweet(
    tweet_id: str,
    text: str,
    *,
    author_id: str,
    conversation_id: str | None = None,
    replied_to: str | None = None,
    in_reply_to_user_id: str | None = None,
    lang: str = "en",
) -> dict[str, Any]:
    """A tweet with every field the connector asks for, in the shape of the collection's examples."""
    data: dict[str, Any] = {
        "author_id": author_id,
        "conversation_id": conversation_id or tweet_id,
        "created_at": snowflake_created_at(tweet_id),
        "edit_history_tweet_ids": [tweet_id],
        "id": tweet_id,
        "lang": lang,
        "text": text,
    }
    if replied_to is not None:
        data["referenced_tweets"] = [{"type": "replied_to", "id": replied_to}]
        data["in_reply_to_user_id"] = in_reply_to_user_id
    return data


def enriched_recorded_mentions(users: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """The 10 recorded mentions with the fields the recording lacks, the authors taken in turn from `users`."""
    payload = recorded_mentions().json()
    authors = itertools.cycle(users)
    return [
        {**t, **tweet(t["id"], t["text"], author_id=next(authors)["id"]), "text": t["text"]}
        for t in payload["data"]
    ]


# -- the server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Timeline:
    """A mentions timeline served in pages the way X pages it."""

    tweets: list[dict[str, Any]] = field(default_factory=list)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # next_token -> until id (exclusive)

    def add(self, *tweets: Mapping[str, Any], users: Sequence[Mapping[str, Any]] = ()) -> None:
        self.tweets.extend(dict(t) for t in tweets)
        self.users.update({u["id"]: dict(u) for u in users})

    def page(self, query: Mapping[str, str], token_param: str = "pagination_token") -> Reply:
        since = int(query.get("since_id", "0"))
        until: int | None = None
        token = query.get(token_param)
        if token is not None:
            if token not in self.tokens:
                return json_reply(
                    400,
                    "Bad Request",
                    {
                        "errors": [
                            {
                                "parameters": {token_param: [token]},
                                "message": f"The `{token_param}` query parameter value [{token}] is not valid",
                            }
                        ],
                        "title": "Invalid Request",
                        "detail": "One or more parameters to your request was invalid.",
                        "type": "https://api.twitter.com/2/problems/invalid-request",
                    },
                )
            until = self.tokens[token]
        size = int(query.get("max_results", "10"))
        eligible = sorted(
            (t for t in self.tweets if int(t["id"]) > since and (until is None or int(t["id"]) < until)),
            key=lambda t: int(t["id"]),
            reverse=True,
        )
        page, rest = eligible[:size], eligible[size:]
        fields = set(DEFAULT_TWEET_FIELDS) | set(filter(None, query.get("tweet.fields", "").split(",")))
        payload: dict[str, Any] = {}
        if page:
            payload["data"] = [{k: v for k, v in t.items() if k in fields} for t in page]
            if "author_id" in query.get("expansions", "").split(","):
                user_fields = set(DEFAULT_USER_FIELDS) | set(
                    filter(None, query.get("user.fields", "").split(","))
                )
                authors = dict.fromkeys(t["author_id"] for t in page if "author_id" in t)
                found = [self.users[a] for a in authors if a in self.users]
                if found:
                    payload["includes"] = {
                        "users": [{k: v for k, v in u.items() if k in user_fields} for u in found]
                    }
        meta: dict[str, Any] = {}
        if rest:
            next_token = _token(len(self.tokens))
            self.tokens[next_token] = int(page[-1]["id"])
            meta["next_token"] = next_token
        meta["result_count"] = len(page)
        if page:
            meta["newest_id"], meta["oldest_id"] = page[0]["id"], page[-1]["id"]
        payload["meta"] = meta
        # The header set of the recorded mentions response.
        recorded_headers = dict(recorded_mentions().headers)
        headers = {
            k.replace("-", "_"): v
            for k, v in recorded_headers.items()
            if k.startswith(("api-", "x-rate-limit"))
        }
        return json_reply(200, "OK", payload, **headers)


def _token(n: int) -> str:
    """An opaque token shaped like the recorded ``7140dibdnow9c7btw423i3sy3u5zupmkcpofxcsmxj48j``."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    seed = (n + 1) * 0x9E3779B97F4A7C15
    chars = []
    for _ in range(45):
        seed, digit = divmod(seed * 31 + 7, 36)
        chars.append(alphabet[digit])
        seed = seed or (n + 17) * 0x5851F42D4C957F2D
    return "".join(chars)


Handler = Callable[[Request], Reply]


class XServer:
    """The loopback X API. Use as a context manager; `base_url` goes into the ``api_base_url`` setting."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.timeline: Timeline | None = None
        # Recent search: one timeline per query as the connector sends it (``(<query>) -is:retweet``).
        self.searches: dict[str, Timeline] = {}
        self._scripts: dict[tuple[str, str], deque[Reply | None]] = {}
        self._created = itertools.count(int(RECORDED_TWEET_ID))
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, name="x-loopback", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> XServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def script(self, method: str, path_pattern: str, *replies: Reply | None) -> None:
        """Answer the next requests matching `path_pattern` (a regex) with `replies` in turn.

        ``None`` in the list means "answer normally this time".
        """
        with self._lock:
            self._scripts.setdefault((method, path_pattern), deque()).extend(replies)

    def sent(self, method: str | None = None, path_pattern: str = "") -> list[Request]:
        """The requests received, optionally only those of `method` whose path matches `path_pattern`."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and re.search(path_pattern, r.path) is not None
            ]

    def answer(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append(request)
            for (method, pattern), queue in self._scripts.items():
                if method == request.method and queue and re.fullmatch(pattern, request.path):
                    scripted = queue.popleft()
                    if scripted is not None:
                        return scripted
                    break
            if request.method == "GET" and re.fullmatch(r"/2/users/[0-9]+/mentions", request.path):
                if self.timeline is not None:
                    return self.timeline.page(request.query)
                return recorded_mentions()
            if request.method == "GET" and request.path == "/2/tweets/search/recent":
                found = self.searches.get(request.query.get("query", ""))
                return (found or Timeline()).page(request.query, token_param="next_token")
            if request.method == "POST" and request.path == "/2/tweets":
                return self._created_tweet(request)
        return problem(
            404, "Not Found Error", f"no route for {request.method} {request.path} on the loopback X"
        )

    def _created_tweet(self, request: Request) -> Reply:
        base = recorded_created_tweet()
        tweet_id = str(next(self._created))
        if tweet_id == RECORDED_TWEET_ID:
            return base  # the recorded bytes, exactly
        payload = base.json()
        payload["data"] = {"id": tweet_id, "text": request.json().get("text", "")}
        kept = {
            k.replace("-", "_"): v
            for k, v in base.headers
            if k.lower() not in ("content-encoding", "location")
        }
        return json_reply(
            base.status, base.reason, payload, **kept, location=f"https://api.twitter.com/2/tweets/{tweet_id}"
        )

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                request = Request(self.command, parts.path, query, dict(self.headers.items()), body)
                reply = server.answer(request)
                self.send_response(reply.status, reply.reason)
                for name, value in reply.headers:
                    self.send_header(name, value)
                if reply.header("date") is None:
                    self.send_header("date", formatdate(usegmt=True))
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_DELETE = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
