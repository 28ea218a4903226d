"""The X (Twitter) channel: mentions of our account in, public replies out, on tweepy's API v2 client.

Settings (``[accounts.<name>]`` in replyclock.toml, besides ``kind = "x"``):

    ``user_id``                  our account's numeric user id (required; also our own id by default).
    ``bearer_token_env``         env var with the app's bearer token (default ``X_BEARER_TOKEN``); reads
                                 mentions. Optional: without it mentions are read with the user context.
    ``consumer_key_env``         env var names of the OAuth 1.0a user-context credentials, required to
    ``consumer_secret_env``      post replies (defaults ``X_CONSUMER_KEY``, ``X_CONSUMER_SECRET``,
    ``access_token_env``         ``X_ACCESS_TOKEN``, ``X_ACCESS_TOKEN_SECRET``).
    ``access_token_secret_env``
    ``api_base_url``             default ``https://api.twitter.com`` (tests point it at a loopback server).
    ``max_results``              mentions per page, 5 to 100 (default 100).
    ``timeout``                  seconds per HTTP request (default 30).
    ``since_id``                 optional: on the very first fetch (no cursor yet) only read mentions newer
                                 than this tweet id, instead of the up to 800 most recent ones.
    ``search``                   optional list of recent-search queries (``["acme app", "#acmehelp"]``):
                                 listening for posts that do not tag us. Each is sent as
                                 ``(<query>) -is:retweet`` to ``GET /2/tweets/search/recent`` (last 7 days).
    ``search_team``              the team such posts go to (default: the routing rules decide).
    ``search_priority``          their priority (default ``"low"``).
    ``search_acknowledge``       acknowledge them automatically (default false: an unsolicited public
                                 reply reads as spam).
    ``my_username``              optional: our @username, to recognise a search hit that mentions us
                                 by name in its text (hits that mention us are treated as mentions).

The cursor is a JSON object. Between polls it is ``{"since_id": S}``: everything up to tweet S is
stored. X pages a mentions timeline newest first, so a poll that finds several pages stores them one
page per fetch, each in one transaction with the cursor ``{"since_id": S, "next_token": T,
"newest_id": N}``: S is still the old bound (a restart continues page T with the same ``since_id``,
so no older post is skipped) and N, the newest id of the first page, becomes the new ``since_id``
only once the last page is stored. With ``search`` queries the cursor also holds ``"search": {<query>:
{"since_id": ..., "next_token": ..., "newest_id": ...}}``, one such state per query, paged the same
way; a poll round reads the first page of mentions and of every query, then the further pages one
per fetch. A tweet found by a search and also mentioning us is a mention (same post, same routing),
whichever way it arrives first. A crash anywhere re-fetches at most one page, and the
(account, external id) key stores each post once.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Unpack

import requests
import tweepy
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError

from connectors.base import (
    AuthFailed,
    Batch,
    Connector,
    ConnectorError,
    ConnectorOptions,
    InboundPost,
    NotSent,
    RateLimited,
    ReplyAuthFailed,
    ReplyOutcomeUnknown,
    ReplyTarget,
    ShapeError,
    SkippedItem,
    describe_json,
)

log = logging.getLogger("replyclock.connectors.x")

# tweepy builds every URL on this host (BaseClient.request); api_base_url swaps this prefix.
TWEEPY_HOST = "https://api.twitter.com"
DEFAULT_API_BASE_URL = TWEEPY_HOST
DEFAULT_ENV = {
    "bearer_token_env": "X_BEARER_TOKEN",
    "consumer_key_env": "X_CONSUMER_KEY",
    "consumer_secret_env": "X_CONSUMER_SECRET",
    "access_token_env": "X_ACCESS_TOKEN",
    "access_token_secret_env": "X_ACCESS_TOKEN_SECRET",
}
USER_CONTEXT_KEYS = ("consumer_key_env", "consumer_secret_env", "access_token_env", "access_token_secret_env")
SETTINGS_KEYS = (
    "user_id",
    *DEFAULT_ENV,
    "api_base_url",
    "max_results",
    "timeout",
    "since_id",
    "search",
    "search_team",
    "search_priority",
    "search_acknowledge",
    "my_username",
)
SEARCH_PRIORITIES = ("low", "normal", "high", "urgent")
MIN_SEARCH_RESULTS = 10  # the recent-search endpoint refuses fewer
DEFAULT_MAX_RESULTS = 100
MIN_MAX_RESULTS = 5  # the mentions endpoint refuses fewer
MAX_MAX_RESULTS = 100
DEFAULT_TIMEOUT = 30.0
# X's rate-limit windows are 15 minutes: the wait when a 429 carries no reset header.
DEFAULT_RATE_LIMIT_WAIT = timedelta(minutes=15)

TWEET_FIELDS = [
    "created_at",
    "author_id",
    "conversation_id",
    "in_reply_to_user_id",
    "referenced_tweets",
    "lang",
]
# Search hits also need entities.mentions, to tell a hit that mentions us.
SEARCH_TWEET_FIELDS = [*TWEET_FIELDS, "entities"]
EXPANSIONS = ["author_id"]
USER_FIELDS = ["username", "name"]

# Tweet ids are snowflakes: milliseconds since this epoch, shifted left 22 bits.
SNOWFLAKE_EPOCH_MS = 1288834974657
UNKNOWN_AUTHOR = "unknown"
# `lang` values that name no language: undetermined, no linguistic content, and X's own
# "only media / mentions / hashtags / cashtags / very short" codes.
NO_LANGUAGE = frozenset({"und", "zxx", "qam", "qct", "qht", "qme", "qst"})
# v1.1-style error code that X sends with a 503 when it refused the request for load, before acting.
OVER_CAPACITY = 130

_DIGITS = re.compile(r"[0-9]{1,20}")
_BEARER = re.compile(r"Bearer [^\s'\"},]+")


class _RedactBearer(logging.Filter):
    """tweepy logs its request headers, bearer token included, at DEBUG: blank the token out."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Bearer " in message:
            record.msg = _BEARER.sub("Bearer [redacted]", message)
            record.args = None
        return True


_tweepy_log = logging.getLogger("tweepy.client")
if not any(isinstance(f, _RedactBearer) for f in _tweepy_log.filters):
    _tweepy_log.addFilter(_RedactBearer())


@dataclass(frozen=True)
class XCursor:
    """Where the mentions timeline stands (see the module docstring)."""

    since_id: str | None = None
    next_token: str | None = None
    newest_id: str | None = None

    def dump(self) -> str:
        values = {"since_id": self.since_id, "next_token": self.next_token, "newest_id": self.newest_id}
        return json.dumps({key: value for key, value in values.items() if value is not None}, sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> XCursor:
        """Parse a stored cursor; a bare tweet id (set by hand) is taken as ``since_id``.

        Raises:
            ConnectorError: the text is neither (not retryable: it needs a human).
        """
        if text is None or not text.strip():
            return cls()
        text = text.strip()
        if _DIGITS.fullmatch(text):
            return cls(since_id=text)
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            since_id, next_token, newest_id = (
                data.get(key) for key in ("since_id", "next_token", "newest_id")
            )
            if (
                _optional_id(since_id)
                and _optional_id(newest_id)
                and (next_token is None or (isinstance(next_token, str) and next_token))
            ):
                return cls(since_id=since_id, next_token=next_token, newest_id=newest_id)
        error = ConnectorError(
            'X cursor is not {"since_id": ..., "next_token": ..., "newest_id": ...} nor a tweet id: '
            f"{text[:200]!r}"
        )
        error.retryable = False
        raise error


@dataclass(frozen=True)
class XState:
    """The whole cursor: the mentions timeline and, with ``search``, one `XCursor` per query."""

    mentions: XCursor
    search: tuple[tuple[str, XCursor], ...] = ()

    def dump(self) -> str:
        data = json.loads(self.mentions.dump())
        if self.search:
            data["search"] = {query: json.loads(state.dump()) for query, state in self.search}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> XState:
        """Parse a stored cursor (also the older mentions-only forms).

        Raises:
            ConnectorError: not a cursor (not retryable).
        """
        data = None
        if text is not None and text.strip().startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        if isinstance(data, dict) and "search" in data:
            searches = data.pop("search")
            if not isinstance(searches, dict):
                error = ConnectorError(f"X cursor: search is not an object: {str(text)[:200]!r}")
                error.retryable = False
                raise error
            return cls(
                mentions=XCursor.load(json.dumps(data)),
                search=tuple(
                    (str(query), XCursor.load(json.dumps(state))) for query, state in sorted(searches.items())
                ),
            )
        return cls(mentions=XCursor.load(text))

    def query(self, query: str) -> XCursor:
        return dict(self.search).get(query, XCursor())

    def with_query(self, query: str, state: XCursor) -> XState:
        return XState(self.mentions, tuple(sorted({**dict(self.search), query: state}.items())))


def _optional_id(value: object) -> bool:
    return value is None or (isinstance(value, str) and _DIGITS.fullmatch(value) is not None)


def snowflake_time(tweet_id: str) -> datetime:
    """When a tweet was created, read from its id: ((id >> 22) + 1288834974657) ms since the Unix epoch."""
    milliseconds = (int(tweet_id) >> 22) + SNOWFLAKE_EPOCH_MS
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)


def _replied_to(tweet: Mapping[str, Any]) -> str | None:
    for reference in _references(tweet):
        if reference.get("type") == "replied_to" and isinstance(reference.get("id"), str):
            return str(reference["id"])
    return None


def _references(tweet: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    references = tweet.get("referenced_tweets")
    if not isinstance(references, list):
        return []
    return [reference for reference in references if isinstance(reference, Mapping)]


def is_retweet(tweet: Mapping[str, Any]) -> bool:
    """A retweet repeats someone's post (``RT @a: @us ...``): not a new customer post."""
    return any(reference.get("type") == "retweeted" for reference in _references(tweet))


def users_by_id(payload: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``includes.users`` of a response, by user id."""
    includes = payload.get("includes")
    users = includes.get("users") if isinstance(includes, Mapping) else None
    if not isinstance(users, list):
        return {}
    return {str(user["id"]): user for user in users if isinstance(user, Mapping) and "id" in user}


def normalise(tweet: Mapping[str, Any], users: Mapping[str, Mapping[str, Any]]) -> InboundPost:
    """One API v2 tweet object as an `InboundPost`; every field but ``id`` and ``text`` may be missing.

    Raises:
        ShapeError: the tweet has no usable ``id`` (field ``id``).
    """
    tweet_id = tweet.get("id")
    if not isinstance(tweet_id, str) or not _DIGITS.fullmatch(tweet_id):
        raise ShapeError("id", f"expected a tweet id as a string of digits, got {describe_json(tweet_id)}")
    raw_author = tweet.get("author_id")
    author_id = str(raw_author) if isinstance(raw_author, str | int) and str(raw_author) else UNKNOWN_AUTHOR
    user = users.get(author_id, {})
    username = user.get("username") if isinstance(user.get("username"), str) else None
    name = user.get("name") if isinstance(user.get("name"), str) else None
    handle = username.lstrip("@") if username else None
    text = tweet.get("text")
    reply_to = _replied_to(tweet)
    conversation = tweet.get("conversation_id")
    lang = tweet.get("lang")
    return InboundPost(
        external_id=tweet_id,
        author_id=author_id,
        # X escapes &, < and > in v2 text; InboundPost.text is plain text.
        text=html.unescape(text) if isinstance(text, str) else "",
        posted_at=_parse_time(tweet.get("created_at")) or snowflake_time(tweet_id),
        author_name=name,
        author_handle=handle or None,
        url=f"https://x.com/{handle or 'i'}/status/{tweet_id}",
        thread_id=conversation if isinstance(conversation, str) and conversation else (reply_to or tweet_id),
        reply_to_id=reply_to,
        language=lang if isinstance(lang, str) and lang and lang not in NO_LANGUAGE else None,
        raw=dict(tweet),
    )


def page_items(payload: Mapping[str, Any]) -> list[object]:
    """The items of ``data``: an array as it is, a single tweet object as one item, none if absent.

    Raises:
        ShapeError: ``data`` is something else (field ``data``).
    """
    data = payload.get("data")
    if data is None:
        return []
    if isinstance(data, list):
        return list(data)
    if isinstance(data, Mapping):
        return [data]
    raise ShapeError("data", f"expected an array of tweets, got {describe_json(data)}")


def parse_page(payload: Mapping[str, Any]) -> tuple[list[InboundPost], list[SkippedItem]]:
    """The posts of one mentions page, oldest first, and the malformed items left out of them.

    Retweets are left out silently (they are not customer posts).

    Raises:
        ShapeError: ``data`` is neither an array nor a tweet object.
    """
    users = users_by_id(payload)
    posts: list[InboundPost] = []
    skipped: list[SkippedItem] = []
    for index, tweet in enumerate(page_items(payload)):
        where = f"data[{index}]"
        if not isinstance(tweet, Mapping):
            skipped.append(SkippedItem(where, f"expected a tweet object, got {describe_json(tweet)}", tweet))
            continue
        if is_retweet(tweet):
            continue
        try:
            posts.append(normalise(tweet, users))
        except ShapeError as error:
            raw_id = tweet.get("id")
            skipped.append(
                SkippedItem(
                    f"{where}.{error.field}",
                    error.reason,
                    _jsonable(tweet),
                    str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None,
                )
            )
    return sorted(posts, key=lambda post: int(post.external_id)), skipped


def parse_mentions(payload: Mapping[str, Any]) -> list[InboundPost]:
    """The posts of one mentions page, oldest first; retweets and malformed tweets are left out."""
    return parse_page(payload)[0]


def _jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))  # type: ignore[no-any-return]


def _newest(ids: Iterable[object]) -> str | None:
    """The greatest id, as digits; JSON numbers count (a malformed tweet's number id still moves the
    cursor past it), anything else is ignored."""
    valid = [
        int(value)
        for value in ids
        if (isinstance(value, str) and _DIGITS.fullmatch(value))
        or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    ]
    return str(max(valid)) if valid else None


class BaseUrlAdapter(HTTPAdapter):
    """Sends what tweepy addresses to ``https://api.twitter.com`` to another base URL (prefix swap).

    It also gives every request a timeout: tweepy sets none, and a hung connection would hold a poll.
    """

    def __init__(self, base_url: str, *, timeout: float) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        url = request.url or ""
        if self.base_url != TWEEPY_HOST and (url == TWEEPY_HOST or url.startswith(TWEEPY_HOST + "/")):
            request.url = self.base_url + url[len(TWEEPY_HOST) :]
            # The proxies were chosen for api.twitter.com; choose again for where it really goes.
            no_proxy = proxies.get("no_proxy") if proxies else None
            if requests.utils.should_bypass_proxies(request.url, no_proxy=no_proxy):
                proxies = {}
        return super().send(
            request,
            stream=stream,
            timeout=self.timeout if timeout is None else timeout,
            verify=verify,
            cert=cert,
            proxies=proxies,
        )


def _not_connected(error: requests.RequestException) -> bool:
    """True when the request certainly never reached X (no connection was made)."""
    if isinstance(error, requests.ConnectTimeout | requests.exceptions.SSLError):
        return True
    if isinstance(error, requests.ConnectionError):
        reason = error.args[0] if error.args else None
        if isinstance(reason, MaxRetryError):
            reason = reason.reason
        return isinstance(reason, NewConnectionError)
    return False


class XConnector(Connector):
    """Mentions of our X account become posts; replies go out as tweets in reply."""

    kind: ClassVar[str] = "x"
    settings_keys: ClassVar[tuple[str, ...] | None] = SETTINGS_KEYS
    settings_label: ClassVar[str] = "X"

    def __init__(self, name: str, **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(name, **options)
        raw_user = self.settings.get("user_id")
        if raw_user is None or isinstance(raw_user, bool):
            raise ValueError("setting user_id is required: the numeric user id of our X account")
        self.user_id = str(raw_user).strip()
        if not _DIGITS.fullmatch(self.user_id):
            raise ValueError(f"setting user_id must be a numeric X user id, not {raw_user!r}")
        self.include_own_id(self.user_id)

        secrets = {key: self._secret(key) for key in DEFAULT_ENV}
        missing = [self._env_name(key) for key in USER_CONTEXT_KEYS if secrets[key] is None]
        if missing:
            raise ValueError(
                f"environment variable(s) {', '.join(missing)} not set: the OAuth 1.0a user-context "
                "credentials of our X account are needed to post replies"
            )
        self.uses_bearer = secrets["bearer_token_env"] is not None

        self.api_base_url = self.url_setting("api_base_url", DEFAULT_API_BASE_URL)

        max_results = self.settings.get("max_results", DEFAULT_MAX_RESULTS)
        if isinstance(max_results, bool) or not isinstance(max_results, int):
            raise ValueError(f"setting max_results must be an integer, not {max_results!r}")
        if not MIN_MAX_RESULTS <= max_results <= MAX_MAX_RESULTS:
            raise ValueError(f"setting max_results must be between {MIN_MAX_RESULTS} and {MAX_MAX_RESULTS}")
        self.max_results = max_results

        timeout = self.seconds_setting("timeout", DEFAULT_TIMEOUT)

        since_id = self.settings.get("since_id")
        if since_id is not None and (isinstance(since_id, bool) or not _DIGITS.fullmatch(str(since_id))):
            raise ValueError(f"setting since_id must be a tweet id, not {since_id!r}")
        self.initial_since_id = str(since_id) if since_id is not None else None

        search = self.settings.get("search", [])
        if not isinstance(search, list) or not all(isinstance(q, str) and q.strip() for q in search):
            raise ValueError(f"setting search must be a list of search queries, not {search!r}")
        if any(len(q) > 480 for q in search):
            raise ValueError("setting search: a recent-search query is at most 512 characters (480 here)")
        self.search: tuple[str, ...] = tuple(dict.fromkeys(q.strip() for q in search))
        team = self.settings.get("search_team")
        if team is not None and (not isinstance(team, str) or not team):
            raise ValueError(f"setting search_team must name a team, not {team!r}")
        self.search_team: str | None = team
        priority = self.settings.get("search_priority", "low")
        if priority not in SEARCH_PRIORITIES:
            raise ValueError(
                f"setting search_priority must be one of {', '.join(SEARCH_PRIORITIES)}, not {priority!r}"
            )
        self.search_priority = str(priority)
        acknowledge = self.settings.get("search_acknowledge", False)
        if not isinstance(acknowledge, bool):
            raise ValueError(f"setting search_acknowledge must be true or false, not {acknowledge!r}")
        self.search_acknowledge = acknowledge
        username = self.settings.get("my_username")
        if username is not None and (
            not isinstance(username, str) or not re.fullmatch(r"@?\w{1,15}", username)
        ):
            raise ValueError(f"setting my_username must be an X username, not {username!r}")
        self.my_username = username.lstrip("@").lower() if isinstance(username, str) else None

        self.client = tweepy.Client(
            bearer_token=secrets["bearer_token_env"],
            consumer_key=secrets["consumer_key_env"],
            consumer_secret=secrets["consumer_secret_env"],
            access_token=secrets["access_token_env"],
            access_token_secret=secrets["access_token_secret_env"],
            return_type=dict,
            wait_on_rate_limit=False,
        )
        self.client.session.mount(TWEEPY_HOST + "/", BaseUrlAdapter(self.api_base_url, timeout=timeout))

    def _env_name(self, key: str) -> str:
        return self.env_name_setting(key, DEFAULT_ENV[key])

    def _secret(self, key: str) -> str | None:
        return self.environ.get(self._env_name(key), "").strip() or None

    def __repr__(self) -> str:
        return f"XConnector({self.name!r}, user_id={self.user_id!r}, api_base_url={self.api_base_url!r})"

    # -- reading -------------------------------------------------------------------------------

    def fetch(self, cursor: str | None) -> Batch:
        """One page of mentions (and, with ``search``, of the queries) after the cursor, oldest first.

        ``more`` while X has further pages of any of them. Raises as `fetch_mentions`.
        """
        if not self.search:
            return self.fetch_mentions(cursor)
        state = XState.load(cursor)
        posts: list[InboundPost] = []
        pending = [query for query in self.search if state.query(query).next_token]
        if state.mentions.next_token:
            batch = self.fetch_mentions(state.mentions.dump())
            posts.extend(batch.posts)
            state = XState(XCursor.load(batch.cursor), state.search)
        elif pending:
            found, query_state = self._search_page(pending[0], state.query(pending[0]))
            posts.extend(found)
            state = state.with_query(pending[0], query_state)
        else:  # a new round: the newest page of mentions and of every query
            batch = self.fetch_mentions(state.mentions.dump())
            posts.extend(batch.posts)
            state = XState(XCursor.load(batch.cursor), state.search)
            for query in self.search:
                found, query_state = self._search_page(query, state.query(query))
                posts.extend(found)
                state = state.with_query(query, query_state)
        # Forget the state of queries no longer configured.
        state = XState(state.mentions, tuple((q, c) for q, c in state.search if q in self.search))
        unique: dict[str, InboundPost] = {}
        for post in posts:  # mentions first: a tweet found both ways stays a mention
            unique.setdefault(post.external_id, post)
        more = bool(state.mentions.next_token) or any(state.query(q).next_token for q in self.search)
        ordered = sorted(unique.values(), key=lambda post: int(post.external_id))
        return Batch(posts=tuple(ordered), cursor=state.dump(), more=more)

    def _search_page(self, query: str, state: XCursor) -> tuple[list[InboundPost], XCursor]:
        """One page of a recent search after its own cursor; hits that do not address us are marked."""
        since_id = state.since_id
        payload = self._read(
            lambda: self.client.search_recent_tweets(
                f"({query}) -is:retweet",
                since_id=since_id,
                next_token=state.next_token,
                max_results=max(self.max_results, MIN_SEARCH_RESULTS),
                tweet_fields=SEARCH_TWEET_FIELDS,
                expansions=EXPANSIONS,
                user_fields=USER_FIELDS,
                user_auth=not self.uses_bearer,
            ),
            kind="search",
            request=f"the search {query!r}",
            paging=state.next_token is not None,
        )
        if payload is None:
            return [], XCursor(since_id=since_id)  # expired token: page again from the same bound
        batch = self._page(payload, state, since_id)
        next_state = XCursor.load(batch.cursor)
        if since_id is None and next_state.next_token:
            # The very first search reads its newest page only, not seven days of history.
            next_state = XCursor(since_id=next_state.newest_id)
        return [self._search_hit(post) for post in batch.posts if post.author_id != self.user_id], next_state

    def _addresses_us(self, post: InboundPost) -> bool:
        tweet = post.raw
        if str(tweet.get("in_reply_to_user_id") or "") == self.user_id:
            return True
        entities = tweet.get("entities")
        mentions = entities.get("mentions") if isinstance(entities, Mapping) else None
        for mention in mentions if isinstance(mentions, list) else []:
            if not isinstance(mention, Mapping):
                continue
            if str(mention.get("id") or "") == self.user_id:
                return True
            username = mention.get("username")
            if self.my_username and isinstance(username, str) and username.lower() == self.my_username:
                return True
        return False

    def _search_hit(self, post: InboundPost) -> InboundPost:
        if self._addresses_us(post):
            return post  # a mention: treated exactly as the mentions timeline would deliver it
        return dataclasses.replace(
            post,
            acknowledge=self.search_acknowledge,
            team=self.search_team,
            priority=self.search_priority,
        )

    def fetch_mentions(self, cursor: str | None) -> Batch:
        """One page of mentions after the cursor, oldest first; ``more`` while X has further pages.

        Raises:
            RateLimited: 429, with X's reset time.
            AuthFailed: 401/403, the credentials or the app's access level need a human.
            ConnectorError: anything else (network, 5xx, an unusable answer).
        """
        state = XCursor.load(cursor)
        since_id = state.since_id or (None if state.next_token else self.initial_since_id)
        payload = self._read(
            lambda: self.client.get_users_mentions(
                self.user_id,
                since_id=since_id,
                pagination_token=state.next_token,
                max_results=self.max_results,
                tweet_fields=TWEET_FIELDS,
                expansions=EXPANSIONS,
                user_fields=USER_FIELDS,
                user_auth=not self.uses_bearer,
            ),
            kind="mentions",
            request="the mentions request",
            paging=state.next_token is not None,
        )
        if payload is None:
            # Start the pages again from the same since_id. Nothing is skipped; posts already
            # stored are recognised as duplicates.
            return Batch(posts=(), cursor=XCursor(since_id=since_id).dump(), more=True)
        return self._page(payload, state, since_id)

    def _read(
        self, call: Callable[[], object], *, kind: str, request: str, paging: bool
    ) -> Mapping[str, Any] | None:
        """Call one of X's read endpoints (`kind`: "mentions" or "search") and map its failures.

        Returns:
            The answer; None when X refused our page token (`paging`; tokens expire): page again.

        Raises:
            RateLimited: 429, with X's reset time.
            AuthFailed: 401/403, the credentials or the app's access level need a human.
            ConnectorError: anything else (network, 5xx, a refused `request`, an unusable answer).
        """
        doing = "searching" if kind == "search" else "reading mentions"
        try:
            payload = call()
        except tweepy.TooManyRequests as error:
            raise RateLimited(self._reset_at(error), f"X rate limit {doing} for {self.name}") from error
        except (tweepy.Unauthorized, tweepy.Forbidden) as error:
            note = " (search needs Basic or above)" if kind == "search" else ""
            raise AuthFailed(
                f"X refused our credentials {doing} ({_describe(error)}); check "
                f"{self._credential_names(for_reading=True)} and the app's access level{note}"
            ) from error
        except tweepy.BadRequest as error:
            if not paging:
                raise ConnectorError(f"X refused {request}: {_describe(error)}") from error
            # Most likely an expired pagination token.
            log.warning(
                "X refused the pagination token; restarting the pages",
                extra={"account": self.name, "request": kind, "error": str(error)},
            )
            return None
        except tweepy.HTTPException as error:
            raise ConnectorError(f"X {kind} request failed: {_describe(error)}") from error
        except requests.RequestException as error:
            raise ConnectorError(f"X {kind} request failed: {type(error).__name__}: {error}") from error
        if not isinstance(payload, Mapping):
            raise ConnectorError(f"X {kind} answer is not a JSON object: {type(payload).__name__}")
        return payload

    def _page(self, payload: Mapping[str, Any], state: XCursor, since_id: str | None) -> Batch:
        posts, skipped = parse_page(payload)
        if since_id is not None:
            # A server that ignores since_id hands back what we already have: leave it out here.
            posts = [post for post in posts if int(post.external_id) > int(since_id)]
        meta = payload.get("meta")
        meta = meta if isinstance(meta, Mapping) else {}
        page_ids = [t.get("id") for t in page_items(payload) if isinstance(t, Mapping)]
        page_newest = _newest([meta.get("newest_id"), *page_ids])
        # The first page carries the newest mention; later pages only go further back.
        newest = _newest([state.newest_id, page_newest]) if state.next_token else page_newest
        next_token = meta.get("next_token")
        if isinstance(next_token, str) and next_token and next_token != state.next_token:
            cursor = XCursor(since_id=since_id, next_token=next_token, newest_id=newest)
            return Batch(posts=tuple(posts), cursor=cursor.dump(), more=True, skipped=tuple(skipped))
        return Batch(
            posts=tuple(posts),
            cursor=XCursor(since_id=_newest([newest, since_id])).dump(),
            skipped=tuple(skipped),
        )

    def is_own(self, post: InboundPost) -> bool:
        return post.author_id == self.user_id or super().is_own(post)

    # -- writing -------------------------------------------------------------------------------

    def reply(self, to: ReplyTarget, text: str) -> str:
        """Post `text` as a reply to tweet `to.external_id`; returns the new tweet's id.

        Raises:
            RateLimited: 429 (nothing posted), with X's reset time.
            ReplyAuthFailed: 401 (nothing posted); an `AuthFailed` and a `NotSent`.
            NotSent: X refused it with a 4xx (duplicate text, the tweet is gone, not allowed...),
                answered 503 "over capacity", or no connection could be made.
            ReplyOutcomeUnknown: any other 5xx, a timeout or broken connection once sent, or a
                success without an id: the reply may be posted; never resend it blindly.
        """
        try:
            payload = self.client.create_tweet(text=text, in_reply_to_tweet_id=to.external_id, user_auth=True)
        except tweepy.TooManyRequests as error:
            raise RateLimited(self._reset_at(error), f"X rate limit posting for {self.name}") from error
        except tweepy.Unauthorized as error:
            raise ReplyAuthFailed(
                f"X refused our credentials posting a reply ({_describe(error)}); check "
                f"{self._credential_names(for_reading=False)}"
            ) from error
        except tweepy.TwitterServerError as error:
            if OVER_CAPACITY in error.api_codes:
                raise NotSent(f"X is over capacity and did not post the reply: {_describe(error)}") from error
            raise ReplyOutcomeUnknown(
                f"X answered {_describe(error)}; the reply may or may not be posted"
            ) from error
        except tweepy.HTTPException as error:
            raise NotSent(f"X refused the reply: {_describe(error)}") from error
        except requests.RequestException as error:
            if _not_connected(error):
                raise NotSent(f"could not connect to X: {type(error).__name__}") from error
            raise ReplyOutcomeUnknown(
                f"X reply request broke off ({type(error).__name__}); the reply may or may not be posted"
            ) from error
        data = payload.get("data") if isinstance(payload, Mapping) else None
        tweet_id = data.get("id") if isinstance(data, Mapping) else None
        if not isinstance(tweet_id, str) or not tweet_id:
            raise ReplyOutcomeUnknown("X accepted the reply but its answer has no data.id")
        return tweet_id

    # -- helpers -------------------------------------------------------------------------------

    def _reset_at(self, error: tweepy.TooManyRequests) -> datetime:
        """When the exhausted limit resets: the 15-minute window, or a 24-hour cap when that is spent."""
        headers = error.response.headers
        resets = [error.reset_time]
        for scope in ("user", "app"):
            if headers.get(f"x-{scope}-limit-24hour-remaining") == "0":
                resets.append(headers.get(f"x-{scope}-limit-24hour-reset"))
        epochs = [
            int(value)
            for value in resets
            if isinstance(value, int) or (isinstance(value, str) and value.isdigit())
        ]
        if not epochs:
            return self.clock.now() + DEFAULT_RATE_LIMIT_WAIT
        return datetime.fromtimestamp(max(epochs), tz=UTC)

    def _credential_names(self, *, for_reading: bool) -> str:
        keys: Sequence[str] = ("bearer_token_env",) if for_reading and self.uses_bearer else USER_CONTEXT_KEYS
        return ", ".join(self._env_name(key) for key in keys)


def _describe(error: tweepy.HTTPException) -> str:
    """``403 Forbidden: <X's message>`` on one line."""
    return " ".join(str(error).split())[:500]
