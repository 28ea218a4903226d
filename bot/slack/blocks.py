"""Block Kit for replyclock's Slack messages, built by pure functions (plain dicts, no I/O).

Customer-written text (the post, the author's name and handle, links) reaches a block only
through `bot.core.messages.escape_mrkdwn`, inside mrkdwn text objects marked ``verbatim`` (so
Slack does not auto-link a bare ``@here`` or ``#channel`` either), and is cut to Slack's limits
*before* it is escaped: a cut never lands inside ``&amp;`` or inside an emoji sequence.
The only ``<...>`` sequences in our blocks are ours: mentions of our own experts (intended
pings), date tokens, and links to http(s) addresses we checked.

Limits kept (https://docs.slack.dev/reference/block-kit): section text 3,000 characters,
section fields 10 of 2,000, context elements 10, actions elements 25, button text 75 and
value 2,000, option text 75, 50 blocks per message, 100 per modal. Lengths are counted in
UTF-16 code units, which is never less than what Slack counts, so an emoji-heavy post stays
within limits whichever way Slack counts it.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

from bot.core.messages import duration_in_words, escape_mrkdwn
from bot.core.policy import Expert, Policy
from bot.core.routing import is_on_duty
from bot.slack.ids import (
    ACTION_ANSWERED,
    ACTION_CLAIM,
    ACTION_CLOSE,
    ACTION_REASSIGN,
    ACTION_REPLY,
    ACTION_SNOOZE,
    ACTION_UNCLAIM,
    ACTION_WAIT,
    CLOSE_REASONS,
    REPLY_BLOCK,
    REPLY_INPUT,
    SNOOZE_CHOICES,
    VIEW_REPLY,
    parse_conversation_id,
)
from storage.models import ANSWERED, CLOSED, Conversation, Post

__all__ = [
    "ACTIONS_BLOCK_PREFIX",
    "MAX_BLOCKS",
    "MAX_SECTION_TEXT",
    "Block",
    "CardConversation",
    "CardPost",
    "Message",
    "OverdueItem",
    "admin_alert_message",
    "breach_message",
    "card_actions",
    "card_text",
    "clip_escaped",
    "conversation_card",
    "conversation_id_from_block_id",
    "delivery_problem_message",
    "escalation_message",
    "graphemes",
    "nag_message",
    "overdue_digest",
    "reassign_message",
    "reply_modal",
    "slack_date",
    "storm_entry",
    "storm_summary",
    "thread_note",
    "thread_post_message",
    "utf16_length",
    "warning_message",
]

Block = dict[str, Any]


class CardConversation(Protocol):
    """What a card shows of a conversation: a `storage.models.Conversation`, or its card's columns
    read without the ORM (bot.slack.delivery, a new card's one read)."""

    @property
    def id(self) -> int: ...
    @property
    def team(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def priority(self) -> str: ...
    @property
    def author_id(self) -> str: ...
    @property
    def author_name(self) -> str | None: ...
    @property
    def author_handle(self) -> str | None: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def claimed_by(self) -> str | None: ...
    @property
    def due_at(self) -> datetime: ...
    @property
    def cycle_started_at(self) -> datetime: ...
    @property
    def answered_at(self) -> datetime | None: ...
    @property
    def first_response_at(self) -> datetime | None: ...
    @property
    def answered_by(self) -> str | None: ...
    @property
    def close_reason(self) -> str | None: ...


class CardPost(Protocol):
    """What a card shows of the customer's post (a `storage.models.Post`, or its columns)."""

    @property
    def text(self) -> str: ...
    @property
    def url(self) -> str | None: ...
    @property
    def posted_at(self) -> datetime: ...


MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_FIELD_TEXT = 2000
MAX_CONTEXT_ELEMENTS = 10
MAX_FALLBACK_TEXT = 300  # the notification text: short, it is what phones show
CARD_POST_TEXT = 2800  # leaves room for the quote marks and the ellipsis within MAX_SECTION_TEXT
COMPACT_POST_TEXT = 500
MAX_POST_LINES = 40  # a card is for reading at a glance: the original link has the rest
MAX_NAME = 80
MAX_URL = 1000

ACTIONS_BLOCK_PREFIX = "conversation:"
"""The card's actions block is ``conversation:<id>``: selects carry no value, so a listener
reads the conversation id from the block (`conversation_id_from_block_id`)."""

ELLIPSIS = "\u2026"
_SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
_SLACK_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_PRIORITY_LABEL = {
    "urgent": ":rotating_light: *urgent*",
    "high": ":small_red_triangle: *high*",
    "normal": "normal",
    "low": "low",
}


@dataclass(frozen=True)
class Message:
    """A Slack message: the notification text and its blocks."""

    text: str
    blocks: list[Block] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Safe text


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units (an emoji outside the BMP counts 2)."""
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


_ZWJ = "\u200d"


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def _extends(char: str) -> bool:
    """True for code points that belong to the grapheme before them (UAX #29 Extend/SpacingMark, roughly)."""
    code = ord(char)
    return (
        unicodedata.category(char) in ("Mn", "Me", "Mc")
        or 0xFE00 <= code <= 0xFE0F  # variation selectors (emoji vs text presentation)
        or 0x1F3FB <= code <= 0x1F3FF  # skin tone modifiers
        or 0xE0020 <= code <= 0xE007F  # tag characters (subdivision flags)
        or 0xE0100 <= code <= 0xE01EF
        or code == 0x200C
        or 0x1160 <= code <= 0x11FF  # conjoining Hangul vowels and finals
    )


def graphemes(text: str) -> Iterator[str]:
    """Split text into user-perceived characters, well enough to choose safe cut points.

    A simplified UAX #29: CR LF, a base with its combining marks, variation selectors, skin
    tones and tags, ZWJ sequences (👩‍👩‍👧) and regional-indicator pairs (flags) stay whole.
    """
    index, size = 0, len(text)
    while index < size:
        start = index
        char = text[index]
        index += 1
        if char == "\r" and index < size and text[index] == "\n":
            yield text[start : index + 1]
            index += 1
            continue
        if char in "\r\n":
            yield char
            continue
        if _is_regional_indicator(char) and index < size and _is_regional_indicator(text[index]):
            index += 1
        while index < size:
            following = text[index]
            if following == _ZWJ:
                index += 1
                if index < size and text[index] not in "\r\n":
                    index += 1
            elif _extends(following):
                index += 1
            else:
                break
        yield text[start:index]


# Every line break Python (and a Slack client) may honour: CR LF, lone CR, VT, FF, the file/group/
# record separators, NEL (U+0085), LINE SEPARATOR (U+2028) and PARAGRAPH SEPARATOR (U+2029).
_LINE_BREAKS = re.compile("\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def normalise_line_breaks(text: str) -> str:
    """Every kind of line break as ``\\n``: a quote (``>``) then covers each line the reader sees."""
    return _LINE_BREAKS.sub("\n", text)


def clip_escaped(text: str, limit: int, *, max_lines: int | None = None, quote: bool = False) -> str:
    """Customer text made inert (`escape_mrkdwn`) and cut to at most `limit` UTF-16 units.

    The cut falls between graphemes of the *raw* text, which is escaped afterwards, so it
    never splits an escape sequence (``&amp;``), a surrogate pair or an emoji sequence. A
    cut text ends with "…". With `quote`, every line is a Slack block quote (``>``), which
    sets the customer's words apart from ours; the quote marks count towards the limit.
    """
    text = normalise_line_breaks(text)
    budget = limit - len(ELLIPSIS)
    prefix = "> " if quote else ""
    # Most texts fit whole: escaping is character by character, so escaping the whole text gives
    # what the walk below would join, without splitting it into graphemes (a card's texts cost
    # a third of the sender's CPU per card that way).
    if max_lines is None or text.count("\n") < max_lines:
        whole = escape_mrkdwn(text)
        if quote:
            whole = whole.replace("\n", "\n> ")
        whole = prefix + whole
        if utf16_length(whole) <= budget:
            return whole
    return _clip_walk(text, budget, prefix, max_lines=max_lines, quote=quote)


def _clip_walk(text: str, budget: int, prefix: str, *, max_lines: int | None, quote: bool) -> str:
    """`clip_escaped` grapheme by grapheme, for a text that may not fit (line breaks normalised)."""
    parts = [prefix]
    used = len(prefix)
    lines = 1
    cut = False
    for cluster in graphemes(text):
        piece = escape_mrkdwn(cluster)
        if quote and "\n" in piece:
            piece = piece.replace("\n", "\n> ")
        if "\n" in cluster:
            lines += 1
            if max_lines is not None and lines > max_lines:
                cut = True
                break
        cost = utf16_length(piece)
        if used + cost > budget:
            cut = True
            break
        parts.append(piece)
        used += cost
    shown = "".join(parts)
    if not cut:
        return shown
    return shown + ELLIPSIS


def _clip_label(text: str, limit: int = MAX_NAME) -> str:
    return clip_escaped(" ".join(text.split()), limit)


def _safe_link(url: str | None, label: str) -> str | None:
    """``<url|label>`` for an http(s) address, None otherwise. The label must be our own text."""
    if not url:
        return None
    stripped = url.strip()
    try:
        parts = urllib.parse.urlsplit(stripped)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    # Characters that would end the link, start its label or break the markup are %-encoded;
    # then `&` is escaped as Slack asks for text inside <...>.
    target = escape_mrkdwn(urllib.parse.quote(stripped, safe="/:?#[]@!$&'()*+,;=%~-._"))
    if len(target) > MAX_URL:
        return None  # a link this long is not worth the room it takes from the post
    return f"<{target}|{label}>"


def slack_date(at: datetime, tz: ZoneInfo, token: str = "{date_short_pretty} {time}") -> str:
    """Slack's date token: each reader sees `at` in their own time zone; the fallback uses `tz`."""
    fallback = at.astimezone(tz).strftime("%a %d %b %H:%M %Z")
    return f"<!date^{int(at.timestamp())}^{token}|{fallback}>"


def _mrkdwn(text: str) -> Block:
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _plain(text: str) -> Block:
    return {"type": "plain_text", "text": text, "emoji": True}


def _section(text: str) -> Block:
    return {"type": "section", "text": _mrkdwn(text)}


def _context(*elements: str) -> Block:
    return {"type": "context", "elements": [_mrkdwn(e) for e in elements[:MAX_CONTEXT_ELEMENTS]]}


# --------------------------------------------------------------------------------------------
# People


def _expert(policy: Policy, expert_id: str | None) -> Expert | None:
    if not expert_id:
        return None
    key = expert_id.removeprefix("expert:")
    found = policy.experts.get(key)
    if found is None:
        found = next((e for e in policy.experts.values() if e.slack_id == key), None)
    return found


def _person(policy: Policy, who: str | None, *, now: datetime | None, ping: bool = True) -> str:
    """How to name someone in a message: a mention of one of OUR experts when they are on duty
    (intended pings), their name otherwise; anything else as inert text."""
    if not who:
        return "nobody"
    expert = _expert(policy, who)
    if expert is not None:
        on_duty = now is None or is_on_duty(expert, now)
        if ping and on_duty and _SLACK_USER_ID.match(expert.slack_id):
            return f"<@{expert.slack_id}>"
        name = f"*{_clip_label(expert.name)}*"
        return name if on_duty or now is None else f"{name} (off duty)"
    if who.startswith("account:"):
        return f"our account @{_clip_label(who.removeprefix('account:').lstrip('@'))}"
    bare = who.removeprefix("slack:")
    if _SLACK_USER_ID.match(bare):
        return f"<@{bare}>"
    return _clip_label(who)


def _customer(conversation: CardConversation, *, bold: bool = True) -> str:
    name = conversation.author_name
    handle = conversation.author_handle
    label_name = _clip_label(name) if name else None
    label_handle = _clip_label(handle if handle.startswith("@") else f"@{handle}") if handle else None
    if label_name and label_handle and name and handle and name.strip("@") != handle.strip("@"):
        return f"*{label_name}* {label_handle}" if bold else f"{label_name} ({label_handle})"
    only = label_handle or label_name or _clip_label(conversation.author_id)
    return f"*{only}*" if bold else only


def _customer_plain(conversation: CardConversation) -> str:
    return _customer(conversation, bold=False)


# --------------------------------------------------------------------------------------------
# The card


def _deadline_words(conversation: CardConversation, now: datetime) -> str:
    if conversation.due_at > now:
        return f"due in {duration_in_words(conversation.due_at - now)}"
    if conversation.due_at == now:
        return "due now"
    return f"overdue by {duration_in_words(now - conversation.due_at)}"


def _status(conversation: CardConversation, policy: Policy, now: datetime) -> str:
    if conversation.status == ANSWERED:
        answered_at = conversation.answered_at or conversation.first_response_at or now
        took = duration_in_words(answered_at - conversation.cycle_started_at)
        late = (
            "in time"
            if answered_at <= conversation.due_at
            else f"{duration_in_words(answered_at - conversation.due_at)} late"
        )
        who = _person(policy, conversation.answered_by, now=None, ping=False)
        return f":white_check_mark: Answered by {who} after {took} ({late})"
    if conversation.status == CLOSED:
        reason = conversation.close_reason or ""
        label = CLOSE_REASONS.get(reason) or (_clip_label(reason) if reason else "no reason given")
        return f":no_entry_sign: Closed: {label}"
    if conversation.due_at <= now:
        overdue_by = now - conversation.due_at
        return ":red_circle: *Overdue*" + (
            f" by {duration_in_words(overdue_by)}" if overdue_by >= timedelta(minutes=1) else ""
        )
    return ":large_green_circle: Open"


def _owner_line(conversation: CardConversation, policy: Policy, now: datetime) -> str:
    if conversation.claimed_by:
        return f"Claimed by {_person(policy, conversation.claimed_by, now=now)}"
    if conversation.owner:
        return f"{_person(policy, conversation.owner, now=now)} (proposed)"
    return "Nobody yet: claim it"


def _is_open(conversation: CardConversation) -> bool:
    return conversation.status not in (ANSWERED, CLOSED)


def card_actions(conversation: CardConversation) -> Block:
    """The card's buttons and menus; every button's value is the conversation id."""
    value = str(conversation.id)
    claimed = conversation.claimed_by is not None
    claim: Block = {
        "type": "button",
        "action_id": ACTION_UNCLAIM if claimed else ACTION_CLAIM,
        "text": _plain("Unclaim" if claimed else "Claim"),
        "value": value,
    }
    if not claimed:
        claim["style"] = "primary"
    reassign: Block = {
        "type": "users_select",
        "action_id": ACTION_REASSIGN,
        "placeholder": _plain("Reassign to\u2026"),
    }
    return {
        "type": "actions",
        "block_id": f"{ACTIONS_BLOCK_PREFIX}{conversation.id}",
        "elements": [
            claim,
            reassign,
            {"type": "button", "action_id": ACTION_REPLY, "text": _plain("Reply"), "value": value},
            {
                "type": "static_select",
                "action_id": ACTION_SNOOZE,
                "placeholder": _plain("Snooze"),
                "options": [{"text": _plain(label), "value": key} for key, label in SNOOZE_CHOICES.items()],
            },
            {
                "type": "button",
                "action_id": ACTION_WAIT,
                "text": _plain("Waiting on customer"),
                "value": value,
            },
            {
                "type": "button",
                "action_id": ACTION_ANSWERED,
                "text": _plain("Mark answered"),
                "value": value,
                "confirm": {
                    "title": _plain("Mark as answered?"),
                    "text": _plain("Only if the customer already has a reply: the reminders stop."),
                    "confirm": _plain("Mark answered"),
                    "deny": _plain("Cancel"),
                },
            },
            {
                "type": "static_select",
                "action_id": ACTION_CLOSE,
                "placeholder": _plain("Close"),
                "options": [{"text": _plain(label), "value": key} for key, label in CLOSE_REASONS.items()],
                "confirm": {
                    "title": _plain("Close without a reply?"),
                    "text": _plain("The customer gets no answer and the reminders stop."),
                    "confirm": _plain("Close"),
                    "deny": _plain("Cancel"),
                },
            },
        ],
    }


def conversation_id_from_block_id(block_id: object) -> int | None:
    """The conversation id of a card's actions block (``conversation:42`` -> 42), else None."""
    if not isinstance(block_id, str) or not block_id.startswith(ACTIONS_BLOCK_PREFIX):
        return None
    tail = block_id[len(ACTIONS_BLOCK_PREFIX) :]
    return parse_conversation_id(tail) if tail == tail.strip() else None


def _post_text(post: CardPost | None) -> str:
    return post.text if post is not None and post.text.strip() else "(no text)"


def _truncation_note(post: CardPost | None, shown: str) -> str | None:
    if post is None or not shown.endswith(ELLIPSIS):
        return None
    return f"Cut for Slack: the post has {len(post.text):,} characters."


def conversation_card(
    conversation: CardConversation,
    post: CardPost | None,
    *,
    ctx_policy: Policy,
    now: datetime,
    tz: ZoneInfo,
    compact: bool = False,
) -> list[Block]:
    """The card of a conversation: who wrote what, the deadline, the owner, the status, the actions.

    Args:
        conversation: the conversation (its current state is shown).
        post: the customer's post the card is about (None if it is gone).
        ctx_policy: the policy (expert names and Slack ids, for mentions).
        now: the time the card is rendered (deadline words and on-duty checks).
        tz: the team's time zone, for the date tokens' fallback text.
        compact: the short form used in a storm's thread and in DMs.

    Returns:
        Block Kit blocks (at most 7, each within Slack's limits). Answered and closed cards
        show the outcome and have no actions.
    """
    open_now = _is_open(conversation)
    number = f"#{conversation.id}"
    priority = _PRIORITY_LABEL.get(conversation.priority, _clip_label(conversation.priority))
    due = f"{_deadline_words(conversation, now)} ({slack_date(conversation.due_at, tz)})"
    quoted = clip_escaped(
        _post_text(post),
        COMPACT_POST_TEXT if compact else CARD_POST_TEXT,
        max_lines=8 if compact else MAX_POST_LINES,
        quote=True,
    )
    link = _safe_link(post.url if post else None, "View the original")
    status = _status(conversation, ctx_policy, now)
    if compact:
        lines = [f":speech_balloon: {_customer(conversation)} \u00b7 {number} \u00b7 {priority}", quoted]
        facts = [due if open_now else f"was due {slack_date(conversation.due_at, tz)}"]
        facts.append(_owner_line(conversation, ctx_policy, now) if open_now else status)
        if link:
            facts.append(link)
        lines.append(" \u00b7 ".join(facts))
        blocks = [_section("\n".join(lines))]
        if open_now:
            blocks.append(card_actions(conversation))
        return blocks

    header = _section(f":speech_balloon: {_customer(conversation)} \u00b7 {number}")
    about = [e for e in (link, f"posted {slack_date(post.posted_at, tz)}" if post else None) if e]
    note = _truncation_note(post, quoted)
    if note:
        about.append(note)
    deadline = due if open_now else f"was due {slack_date(conversation.due_at, tz)}"
    fields = [
        _mrkdwn(f"*Deadline*\n{deadline}"),
        _mrkdwn(f"*Priority*\n{priority}"),
        _mrkdwn(f"*Owner*\n{_owner_line(conversation, ctx_policy, now)}"),
        _mrkdwn(f"*Status*\n{status}"),
    ]
    blocks = [header, _section(quoted)]
    if about:
        blocks.append(_context(*about))
    blocks.append({"type": "section", "fields": fields})
    if open_now:
        blocks.append(card_actions(conversation))
    blocks.append(
        _context(f"{number} \u00b7 {conversation.team} \u00b7 card as of {slack_date(now, tz, '{time}')}")
    )
    return blocks


def card_text(
    conversation: CardConversation,
    post: CardPost | None,
    *,
    ctx_policy: Policy,
    now: datetime,
    tz: ZoneInfo,
) -> str:
    """The card's notification text (what a phone shows): short, escaped, no mentions."""
    del ctx_policy, tz  # same signature as conversation_card; the fallback needs neither
    who = _customer_plain(conversation)
    if conversation.status == ANSWERED:
        state = "answered"
    elif conversation.status == CLOSED:
        state = "closed"
    else:
        state = _deadline_words(conversation, now)
    head = f"#{conversation.id} from {who} ({conversation.priority}, {state}): "
    return head + clip_escaped(" ".join(_post_text(post).split()), max(MAX_FALLBACK_TEXT - len(head), 20))


# --------------------------------------------------------------------------------------------
# The reply modal


def reply_modal(conversation: Conversation, post: Post | None, *, max_length: int) -> Block:
    """The modal that sends a public reply to the customer.

    Args:
        conversation: the conversation (its id travels as ``private_metadata``).
        post: the post being answered, shown above the input.
        max_length: the platform's limit for a reply (clamped to Slack's 1..3000).

    Returns:
        A ``views.open`` view.
    """
    limit = min(max(max_length, 1), 3000)
    blocks: list[Block] = [
        _section(f"{_customer(conversation)} wrote (#{conversation.id}):"),
        _section(clip_escaped(_post_text(post), CARD_POST_TEXT, max_lines=MAX_POST_LINES, quote=True)),
    ]
    link = _safe_link(post.url if post else None, "View the original")
    if link:
        blocks.append(_context(link))
    blocks.append(
        {
            "type": "input",
            "block_id": REPLY_BLOCK,
            "label": _plain("Your public reply"),
            "element": {
                "type": "plain_text_input",
                "action_id": REPLY_INPUT,
                "multiline": True,
                "max_length": limit,
                "focus_on_load": True,
            },
            "hint": _plain(f"Posted publicly to the customer, at most {limit} characters."),
        }
    )
    return {
        "type": "modal",
        "callback_id": VIEW_REPLY,
        "private_metadata": str(conversation.id),
        "title": _plain("Reply to customer"),
        "submit": _plain("Send reply"),
        "close": _plain("Cancel"),
        "blocks": blocks,
    }


# --------------------------------------------------------------------------------------------
# Thread and DM messages


def _subject(conversation: Conversation) -> str:
    return f"*#{conversation.id}* from {_customer(conversation)}"


def _fallback(text: str) -> str:
    return text if len(text) <= MAX_FALLBACK_TEXT else text[: MAX_FALLBACK_TEXT - 1] + ELLIPSIS


def _simple(line: str, text: str) -> Message:
    return Message(text=_fallback(text), blocks=[_section(line)])


def warning_message(
    conversation: Conversation, *, ctx_policy: Policy, now: datetime, tz: ZoneInfo
) -> Message:
    """Thread reply: the deadline is near (pings the owner only while on duty)."""
    owner = conversation.claimed_by or conversation.owner
    ask = f"Owner: {_person(ctx_policy, owner, now=now)}." if owner else "Nobody has claimed it yet."
    line = (
        f":hourglass_flowing_sand: {_subject(conversation)} is {_deadline_words(conversation, now)} "
        f"({slack_date(conversation.due_at, tz)}). {ask}"
    )
    return _simple(line, f"#{conversation.id} is {_deadline_words(conversation, now)}")


def at_risk_message(
    conversation: Conversation, forecast_at: datetime, *, ctx_policy: Policy, now: datetime, tz: ZoneInfo
) -> Message:
    """Thread reply: the forecast answer time is past the deadline (before any warning)."""
    owner = conversation.claimed_by or conversation.owner
    line = (
        f":crystal_ball: *At risk*: {_subject(conversation)} is forecast to be answered around "
        f"{slack_date(forecast_at, tz)}, after its deadline {slack_date(conversation.due_at, tz)}. "
        f"Owner: {_person(ctx_policy, owner, now=now)}. Someone free could take it."
    )
    return _simple(
        line,
        f"At risk: #{conversation.id} is forecast for {_fallback_time(forecast_at, tz)}, "
        f"due {_fallback_time(conversation.due_at, tz)}",
    )


def breach_message(conversation: Conversation, *, ctx_policy: Policy, now: datetime, tz: ZoneInfo) -> Message:
    """Thread reply: the deadline passed without an answer."""
    owner = conversation.claimed_by or conversation.owner
    line = (
        f":red_circle: *Deadline missed*: {_subject(conversation)} was due "
        f"{slack_date(conversation.due_at, tz)}. Owner: {_person(ctx_policy, owner, now=now)}."
    )
    return _simple(
        line, f"Deadline missed: #{conversation.id} was due {_fallback_time(conversation.due_at, tz)}"
    )


def _resolution_due(conversation: Conversation) -> datetime:
    # Only called for a conversation with a resolution target (the sweep plans none otherwise).
    return conversation.resolution_due_at or conversation.due_at


def resolution_warning_message(
    conversation: Conversation, *, ctx_policy: Policy, now: datetime, tz: ZoneInfo
) -> Message:
    """Thread reply: the resolution deadline is near (the owner is pinged while on duty)."""
    owner = conversation.claimed_by or conversation.owner
    due = _resolution_due(conversation)
    left = f"due in {duration_in_words(due - now)}" if due > now else "due now"
    ask = f"Owner: {_person(ctx_policy, owner, now=now)}." if owner else "Nobody owns it yet."
    line = (
        f":hourglass_flowing_sand: *Resolution* of {_subject(conversation)} is {left} "
        f"({slack_date(due, tz)}): answer it and close it, or wait on the customer. {ask}"
    )
    return _simple(line, f"Resolution of #{conversation.id} is {left}")


def resolution_breach_message(
    conversation: Conversation, *, ctx_policy: Policy, now: datetime, tz: ZoneInfo
) -> Message:
    """Thread reply: the resolution deadline passed and the conversation is not closed."""
    owner = conversation.claimed_by or conversation.owner
    due = _resolution_due(conversation)
    line = (
        f":red_circle: *Resolution target missed*: {_subject(conversation)} was to be resolved by "
        f"{slack_date(due, tz)}. Owner: {_person(ctx_policy, owner, now=now)}."
    )
    return _simple(line, f"Resolution target missed: #{conversation.id} was due {_fallback_time(due, tz)}")


def _fallback_time(at: datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).strftime("%a %H:%M %Z")


def nag_message(
    conversation: Conversation,
    post: Post | None,
    *,
    ctx_policy: Policy,
    now: datetime,
    tz: ZoneInfo,
    in_thread: bool = False,
) -> Message:
    """A reminder: by DM to the owner with the card's buttons, or in the thread when nobody owns it."""
    late = _deadline_words(conversation, now)
    if in_thread:
        line = f":alarm_clock: Reminder: {_subject(conversation)} is {late} and nobody owns it. Can someone claim it?"
        return _simple(line, f"Reminder: #{conversation.id} is {late}")
    line = f":alarm_clock: Reminder: {_subject(conversation)} is {late}. Please answer it or hand it on."
    blocks = [
        _section(line),
        *conversation_card(conversation, post, ctx_policy=ctx_policy, now=now, tz=tz, compact=True),
    ]
    return Message(text=_fallback(f"Reminder: #{conversation.id} is {late}"), blocks=blocks)


def escalation_message(
    conversation: Conversation,
    post: Post | None,
    *,
    notify: str,
    ctx_policy: Policy,
    now: datetime,
    tz: ZoneInfo,
    team_label: str,
    in_thread: bool = False,
) -> Message:
    """An escalation step.

    Args:
        notify: ``team_channel``, ``manager``, ``on_call`` or ``owner``.
        in_thread: the message goes to the card's thread (the team channel step, or an owner
            who is off duty: named, not mentioned); otherwise it is a DM carrying the card.
    """
    owner = conversation.claimed_by or conversation.owner
    late = _deadline_words(conversation, now)
    if notify == "team_channel":
        line = (
            f":rotating_light: *Escalation*: {_subject(conversation)} is {late}. "
            f"Owner: {_person(ctx_policy, owner, now=now)}. Can someone take it?"
        )
    elif notify in ("manager", "on_call"):
        role = "manager" if notify == "manager" else "on-call person"
        line = (
            f":rotating_light: *Escalation* to you as {role} for {_clip_label(team_label)}: "
            f"{_subject(conversation)} is {late}. Owner: {_person(ctx_policy, owner, now=None, ping=False)}."
        )
    elif in_thread:
        line = (
            f":rotating_light: *Escalation* for {_person(ctx_policy, owner, now=None, ping=False)}: "
            f"{_subject(conversation)} is {late}. They are off duty and were not notified."
        )
    else:
        line = f":rotating_light: *Escalation*: {_subject(conversation)} is {late}. Please answer it now or hand it on."
    blocks = [_section(line)]
    if not in_thread:
        blocks += conversation_card(conversation, post, ctx_policy=ctx_policy, now=now, tz=tz, compact=True)
    return Message(text=_fallback(f"Escalation: #{conversation.id} is {late}"), blocks=blocks)


def thread_note(text: str) -> Message:
    """A short line of history in a card's thread; `text` is escaped (names come from config)."""
    safe = clip_escaped(text, 2000)
    return _simple(f":information_source: {safe}", safe)


def reassign_message(
    conversation: Conversation,
    *,
    ctx_policy: Policy,
    now: datetime,
    owner: str | None,
    previous_owner: str | None,
    note: str | None = None,
    reason: str | None = None,
) -> Message:
    """Thread reply: nobody claimed it in time (or its owner went silent, or their day ended:
    `reason` "silent" or "handover"), so it was offered to the next expert."""
    if reason in ("silent", "handover") and owner != previous_owner:
        was = _person(ctx_policy, previous_owner, now=None, ping=False)
        line = (
            f":arrows_counterclockwise: {was} claimed {_subject(conversation)} but neither answered nor "
            f"acted: offered to {_person(ctx_policy, owner, now=now)}."
            if reason == "silent"
            else f":sunrise: Handover: {was}'s working hours end before {_subject(conversation)} is due: "
            f"{_person(ctx_policy, owner, now=now)} takes it over."
        )
        return _simple(line, f"#{conversation.id} handed over")
    if note or owner == previous_owner:
        line = (
            f":arrows_counterclockwise: Nobody claimed {_subject(conversation)} in time and no other "
            f"expert is on duty: it stays with {_person(ctx_policy, owner, now=now)}."
        )
    else:
        line = (
            f":arrows_counterclockwise: Nobody claimed {_subject(conversation)} in time: offered to "
            f"{_person(ctx_policy, owner, now=now)} (was {_person(ctx_policy, previous_owner, now=None, ping=False)})."
        )
    return _simple(line, f"#{conversation.id} reassigned")


def delivery_problem_message(
    conversation: Conversation, *, kind: str, problem: str, text: str | None, error: str | None
) -> Message:
    """Thread reply, loud: a message to the customer may not have arrived; check by hand.

    Args:
        kind: what we tried to send (``ack``, ``reply``).
        problem: ``delivery_unknown`` (fate unknown) or ``delivery_failed`` (not sent).
        text: what we tried to send (escaped here: it quotes the customer's handle).
        error: the platform's error, if any.
    """
    what = "acknowledgement" if kind == "ack" else "reply"
    if problem == "delivery_unknown":
        state = "*may not have reached*"
        advice = "Look on the platform before sending anything again: it may be there already."
    else:
        state = "*could not be sent to*"
        advice = "Send it by hand on the platform, then mark the conversation answered."
    blocks = [
        _section(
            f":warning: *CHECK BY HAND*: our {what} {state} {_customer(conversation)} (#{conversation.id}). {advice}"
        )
    ]
    if text:
        blocks.append(_section(clip_escaped(text, CARD_POST_TEXT, max_lines=MAX_POST_LINES, quote=True)))
    if error:
        blocks.append(_context(f"Error: {clip_escaped(error, 500)}"))
    return Message(
        text=_fallback(f"CHECK BY HAND: our {what} to #{conversation.id} {state.strip('*')}"), blocks=blocks
    )


def admin_alert_message(text: str, *, account: str | None = None) -> Message:
    """A message for the admin channel (connector credentials refused, and the like)."""
    where = f" ({_clip_label(account)})" if account else ""
    body = clip_escaped(text, 2500)
    return _simple(f":wrench: *replyclock alert*{where}: {body}", f"replyclock alert{where}: {body}")


def thread_post_message(
    conversation: Conversation, post: Post | None, *, ctx_policy: Policy, now: datetime
) -> Message:
    """Thread reply: the customer wrote again (their words escaped, the owner pinged while on duty)."""
    owner = conversation.claimed_by or conversation.owner
    head = f":speech_balloon: {_customer(conversation)} wrote again"
    if owner:
        head += f" (for {_person(ctx_policy, owner, now=now)})"
    blocks = [
        _section(head + ":"),
        _section(clip_escaped(_post_text(post), CARD_POST_TEXT, max_lines=MAX_POST_LINES, quote=True)),
    ]
    link = _safe_link(post.url if post else None, "View the original")
    if link:
        blocks.append(_context(link))
    fallback = f"{_customer_plain(conversation)} wrote again: " + clip_escaped(
        " ".join(_post_text(post).split()), 200
    )
    return Message(text=_fallback(fallback), blocks=blocks)


# --------------------------------------------------------------------------------------------
# Storms


def _channel_label(channel: str) -> str:
    if _SLACK_CHANNEL_ID.match(channel):
        return f"<#{channel}>"
    return _clip_label(channel if channel.startswith("#") else f"#{channel}")


def storm_summary(channel: str, conversations: Sequence[Conversation]) -> Message:
    """One channel message standing for a burst of new conversations ("14 new mentions, 3 urgent").

    The cards themselves go in this message's thread (`storm_entry`); this lists who wrote.
    """
    count = len(conversations)
    urgent = sum(1 for c in conversations if c.priority == "urgent")
    noun = "mention" if count == 1 else "mentions"
    headline = f"{count} new {noun}, {urgent} urgent"
    lines: list[str] = []
    used = 0
    for index, conversation in enumerate(conversations):
        flag = " :rotating_light:" if conversation.priority == "urgent" else ""
        line = f"\u2022 #{conversation.id} {_customer(conversation)}{flag}"
        if used + utf16_length(line) + 1 > MAX_SECTION_TEXT - 40:
            lines.append(f"\u2026 and {count - index} more")
            break
        lines.append(line)
        used += utf16_length(line) + 1
    blocks = [
        _section(f":ocean: *{headline}* in {_channel_label(channel)}. One card each in the thread :thread:"),
        _section("\n".join(lines) if lines else "(none)"),
    ]
    return Message(text=headline, blocks=blocks)


def storm_entry(
    conversation: CardConversation,
    post: CardPost | None,
    *,
    ctx_policy: Policy,
    now: datetime,
    tz: ZoneInfo,
) -> Message:
    """A conversation's card as an entry in a storm summary's thread (compact, with its buttons)."""
    return Message(
        text=card_text(conversation, post, ctx_policy=ctx_policy, now=now, tz=tz),
        blocks=conversation_card(conversation, post, ctx_policy=ctx_policy, now=now, tz=tz, compact=True),
    )


STORM_DIGEST_EXCERPT = 150  # characters of each post in a storm digest (escaped, one line)


def storm_digest(
    channel: str,
    items: Sequence[tuple[Conversation, Post | None]],
    *,
    ctx_policy: Policy,
    now: datetime,
) -> Message:
    """ONE channel message standing for a burst of new conversations, each a line with its Claim
    button ("14 new mentions, 3 urgent" and who wrote what): at Slack's one message a second per
    channel, a storm of 48 conversations costs one post, not 49. The conversations' threads are
    this message's thread; each change of one of them edits this message (`card_update`).

    At most MAX_BLOCKS - 1 conversations (one section each, the headline first).
    """
    shown = list(items)[: MAX_BLOCKS - 1]
    count = len(shown)
    urgent = sum(1 for conversation, _ in shown if conversation.priority == "urgent")
    noun = "mention" if count == 1 else "mentions"
    headline = f"{count} new {noun}, {urgent} urgent"
    result: list[Block] = [
        _section(
            f":ocean: *{headline}* in {_channel_label(channel)}. Replies about any of them in the thread :thread:"
        )
    ]
    for conversation, post in shown:
        flag = " :rotating_light:" if conversation.priority == "urgent" else ""
        if conversation.status in (ANSWERED, CLOSED):
            state = _status(conversation, ctx_policy, now)
        else:
            owner = _owner_line(conversation, ctx_policy, now)
            state = f"{_deadline_words(conversation, now)} · {owner}"
        excerpt = clip_escaped(" ".join(_post_text(post).split()), STORM_DIGEST_EXCERPT)
        line = f"*#{conversation.id}* {_customer(conversation)}{flag}: \u201c{excerpt}\u201d\n{state}"
        section = _section(line)  # bounded: names are clipped to MAX_NAME, the excerpt as above
        if _is_open(conversation):
            claim = card_actions(conversation)["elements"][0]  # the Claim / Unclaim button
            section["accessory"] = claim
        result.append(section)
    return Message(text=headline, blocks=result)


OVERDUE_DIGEST_EXCERPT = 120  # characters of each post in an overdue digest (escaped, one line)


@dataclass(frozen=True)
class OverdueItem:
    """One conversation's line in an overdue digest. `step`: the most urgent of its notices in the
    digest (``escalation`` asks the team to take it, ``breach`` says the deadline passed,
    ``warning`` that it is near)."""

    conversation: Conversation
    post: Post | None
    tz: ZoneInfo
    step: str = "breach"


def overdue_digest(
    channel: str, items: Sequence[OverdueItem], *, ctx_policy: Policy, now: datetime
) -> Message:
    """ONE channel message standing for the breach, escalation and warning notices of several
    conversations that fell due together (or while the channel's pace was spent): a line each,
    with the owner mentioned as the single notice would (on duty: a ping), the customer's words
    escaped. At Slack's one message a second per channel, 49 conversations cost one post, not 49.

    At most MAX_BLOCKS - 1 conversations (one section each, the headline first).
    """
    shown = list(items)[: MAX_BLOCKS - 1]
    counts = {
        step: sum(1 for item in shown if item.step == step) for step in ("breach", "escalation", "warning")
    }
    parts = []
    if counts["breach"]:
        parts.append(f"{counts['breach']} deadline{'s' if counts['breach'] != 1 else ''} missed")
    if counts["escalation"]:
        parts.append(f"{counts['escalation']} escalation{'s' if counts['escalation'] != 1 else ''}")
    if counts["warning"]:
        parts.append(f"{counts['warning']} due soon")
    noun = "conversation" if len(shown) == 1 else "conversations"
    state = "overdue" if counts["breach"] or counts["escalation"] else "due soon"
    headline = f"{len(shown)} {noun} {state}: {', '.join(parts)}"
    emoji = ":red_circle:" if state == "overdue" else ":hourglass_flowing_sand:"
    result: list[Block] = [
        _section(
            f"{emoji} *{headline}* in {_channel_label(channel)}. Owners, please answer them now or hand them on."
        )
    ]
    for item in shown:
        conversation = item.conversation
        owner = _person(ctx_policy, conversation.claimed_by or conversation.owner, now=now)
        flag = " :rotating_light:" if conversation.priority == "urgent" else ""
        if item.step == "escalation":
            head = (
                f":rotating_light: *Escalation*: {_subject(conversation)}{flag} is "
                f"{_deadline_words(conversation, now)}. Owner: {owner}. Can someone take it?"
            )
        elif item.step == "warning":
            head = (
                f":hourglass_flowing_sand: {_subject(conversation)}{flag} is {_deadline_words(conversation, now)} "
                f"({slack_date(conversation.due_at, item.tz)}). Owner: {owner}."
            )
        else:
            head = (
                f":red_circle: *Deadline missed*: {_subject(conversation)}{flag} was due "
                f"{slack_date(conversation.due_at, item.tz)}. Owner: {owner}."
            )
        excerpt = clip_escaped(" ".join(_post_text(item.post).split()), OVERDUE_DIGEST_EXCERPT)
        result.append(_section(f"{head}\n\u201c{excerpt}\u201d"))
    return Message(text=_fallback(headline), blocks=result)


_Shown = TypeVar("_Shown")


def _within_blocks(items: Sequence[_Shown], more: int) -> tuple[list[_Shown], int]:
    """The `items` a digest shows (a section each after its headline, and a last one saying how
    many more when there are more) and how many more it stands for: `more` and those cut."""
    room = MAX_BLOCKS - 1  # after the headline
    if more or len(items) > room:
        room -= 1  # the line of how many more
    shown = list(items)[:room]
    return shown, more + len(items) - len(shown)


FOLLOW_UP_EXCERPT = 300  # characters of each follow-up in a follow-up digest (escaped)
FOLLOW_UPS_SHOWN = 3  # a conversation's newest follow-ups shown in a follow-up digest


def follow_up_digest(
    items: Sequence[tuple[Conversation, Sequence[Post | None]]],
    *,
    ctx_policy: Policy,
    now: datetime,
    more: int = 0,
) -> Message:
    """ONE reply in a storm digest's thread standing for the follow-ups ("wrote again") of several
    of its conversations that are due together (or were put off by the channel's pace): a section
    per conversation naming its owner as `thread_post_message` does (on duty: a ping), its newest
    FOLLOW_UPS_SHOWN follow-ups quoted, the customer's words escaped. At Slack's one message a
    second per channel, a storm's follow-ups cost one post per digest and moment, not one each.

    `items`: (conversation, its follow-ups in the order written). `more`: conversations it stands
    for beyond `items`. At most MAX_BLOCKS - 1 sections (the headline first).
    """
    shown, more = _within_blocks(items, more)
    total = len(shown) + more
    headline = f"{total} customer{'s' if total != 1 else ''} wrote again"
    result: list[Block] = [_section(f":speech_balloon: *{headline}*:")]
    for conversation, posts in shown:
        owner = conversation.claimed_by or conversation.owner
        head = f"{_subject(conversation)} wrote again"
        if owner:
            head += f" (for {_person(ctx_policy, owner, now=now)})"
        newest = list(posts)[-FOLLOW_UPS_SHOWN:]
        lines = [
            clip_escaped(_post_text(post), FOLLOW_UP_EXCERPT, max_lines=6, quote=True) for post in newest
        ]
        if len(posts) > len(newest):
            lines.insert(0, f"_{len(posts) - len(newest)} earlier not shown_")
        result.append(_section(_lines_within(head + ":", lines)))
    if more:
        others = "customer" if more == 1 else "customers"
        result.append(_section(f"\u2026and {more} more {others}: see their conversations in this thread."))
    return Message(text=_fallback(headline), blocks=result)


def _lines_within(head: str, lines: Sequence[str]) -> str:
    """`head`, then `lines` (escaped already) one per line, within MAX_SECTION_TEXT."""
    text = head
    for line in lines:
        if len(text) + 1 + len(line) > MAX_SECTION_TEXT - 2:
            return text + "\n" + ELLIPSIS
        text += "\n" + line
    return text


REMINDER_DIGEST_EXCERPT = 120  # characters of each post in a reminder digest (escaped, one line)


def reminder_digest(items: Sequence[OverdueItem], *, now: datetime, more: int = 0) -> Message:
    """ONE DM standing for the nags of several conversations that fell due together for one person
    (or while their DM's pace was spent): a line each with its lateness, the customer's words
    escaped, and a Reply button. At Slack's one message a second per channel, a storm's nags for
    one owner cost one DM, not one each.

    `more`: conversations it stands for beyond `items` (one line says how many). At most
    MAX_BLOCKS - 1 sections in all (one per conversation, the headline first, the line of `more`).
    """
    shown, more = _within_blocks(items, more)
    total = len(shown) + more
    noun = "conversation is" if total == 1 else "conversations are"
    headline = f"Reminder: {total} {noun} waiting for your answer"
    result: list[Block] = [_section(f":alarm_clock: *{headline}*. Please answer them or hand them on.")]
    for item in shown:
        conversation = item.conversation
        flag = " :rotating_light:" if conversation.priority == "urgent" else ""
        excerpt = clip_escaped(" ".join(_post_text(item.post).split()), REMINDER_DIGEST_EXCERPT)
        section = _section(
            f"{_subject(conversation)}{flag} is {_deadline_words(conversation, now)}\n\u201c{excerpt}\u201d"
        )
        if _is_open(conversation):
            section["accessory"] = {
                "type": "button",
                "action_id": ACTION_REPLY,
                "text": _plain("Reply"),
                "value": str(conversation.id),
            }
        result.append(section)
    if more:
        others = "conversation" if more == 1 else "conversations"
        result.append(
            _section(f"\u2026and {more} more {others} waiting for you: `/replyclock mine` lists them all.")
        )
    return Message(text=_fallback(headline), blocks=result)
