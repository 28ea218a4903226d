"""Block Kit builders, pure: customer text is inert, limits hold, buttons carry the conversation id."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.messages import escape_mrkdwn
from bot.core.policy import Policy
from bot.slack import blocks
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
)
from storage.models import Conversation, Post
from tests.conftest import MONDAY

BERLIN = ZoneInfo("Europe/Berlin")
NASTY = "<!channel> hi <@U123> see <http://evil.example|bank> & *bold* _it_ `code` [bank](http://evil.example) @here <#C999>"
MIXED_EMOJI = [
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",  # family (ZWJ sequence)
    "\U0001f44d\U0001f3fd",  # thumbs up, medium skin tone
    "\U0001f1e9\U0001f1ea",  # flag DE (regional indicator pair)
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # flag Scotland (tags)
    "1\ufe0f\u20e3",  # keycap one
    "\U0001f9d1\U0001f3fe\u200d\U0001f4bb",  # technologist, skin tone, ZWJ
    "\u2764\ufe0f",  # red heart, emoji presentation
    "e\u0301",  # e + combining acute
    "&",
    "<",
]


# ------------------------------------------------------------------------------------------------
# Helpers


def conversation(**changes: Any) -> Conversation:
    values: dict[str, Any] = dict(
        id=42,
        account_id=1,
        author_id="id-ana",
        author_name="Ana Smith",
        author_handle="ana",
        status="open",
        team="billing",
        priority="high",
        policy="billing",
        owner="maria",
        claimed_by=None,
        opened_at=MONDAY,
        cycle=0,
        cycle_started_at=MONDAY,
        clock_started_at=MONDAY,
        due_at=MONDAY + timedelta(hours=3, minutes=20),
        last_customer_post_at=MONDAY,
        answered_at=None,
        answered_by=None,
        first_response_at=None,
        close_reason=None,
        closed_at=None,
    )
    values.update(changes)
    return Conversation(**values)


def post(text: str = NASTY, url: str | None = "https://social.example/ana/1") -> Post:
    return Post(
        id=7,
        account_id=1,
        external_id="1",
        direction="in",
        author_id="id-ana",
        author_handle="ana",
        author_name="Ana Smith",
        text=text,
        url=url,
        posted_at=MONDAY,
        received_at=MONDAY,
        conversation_id=42,
    )


def card(
    policy: Policy, conv: Conversation | None = None, the_post: Post | None = None, **kw: Any
) -> list[blocks.Block]:
    return blocks.conversation_card(
        conv or conversation(), the_post or post(), ctx_policy=policy, now=MONDAY, tz=BERLIN, **kw
    )


def units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def texts(value: Any) -> list[str]:
    """Every text object's text in a structure of blocks."""
    if isinstance(value, dict):
        found = [value["text"]] if isinstance(value.get("text"), str) else []
        return found + [t for v in value.values() if isinstance(v, dict | list) for t in texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in texts(v)]
    return []


def elements(block_list: list[blocks.Block]) -> list[dict[str, Any]]:
    return [e for b in block_list if b["type"] == "actions" for e in b["elements"]]


def assert_within_slack_limits(block_list: list[blocks.Block], max_blocks: int = 50) -> None:
    """Slack's Block Kit limits, counted in UTF-16 units (never less than what Slack counts)."""
    assert 0 < len(block_list) <= max_blocks
    for block in block_list:
        kind = block["type"]
        if kind == "section":
            assert "text" in block or block.get("fields")
            if "text" in block:
                assert 0 < units(block["text"]["text"]) <= 3000
            assert len(block.get("fields", [])) <= 10
            assert all(units(f["text"]) <= 2000 for f in block.get("fields", []))
        elif kind == "context":
            assert 0 < len(block["elements"]) <= 10
            assert all(units(e["text"]) <= 3000 for e in block["elements"])
        elif kind == "actions":
            assert 0 < len(block["elements"]) <= 25
            assert len(block.get("block_id", "")) <= 255
            for element in block["elements"]:
                if element["type"] == "button":
                    assert len(element["text"]["text"]) <= 75
                    assert len(element["value"]) <= 2000
                for option in element.get("options", []):
                    assert len(option["text"]["text"]) <= 75 and len(option["value"]) <= 150
        elif kind == "input":
            assert element_ok(block["element"])
    for text in texts(block_list):
        assert_entities_whole(text)


def element_ok(element: dict[str, Any]) -> bool:
    return int(element.get("max_length", 1)) <= 3000


def assert_entities_whole(text: str) -> None:
    """Every & starts a whole entity: no escape sequence was cut."""
    for match in re.finditer("&", text):
        assert re.match(r"&(amp|lt|gt);", text[match.start() :]), text[match.start() : match.start() + 8]


def assert_customer_text_inert(value: Any) -> None:
    dumped = json.dumps(value, ensure_ascii=False)
    assert "<@U123" not in dumped and "<#C999" not in dumped and "<http://evil" not in dumped
    assert all(dumped.startswith("<!date^", m.start()) for m in re.finditer("<!", dumped)), (
        "only our date tokens"
    )
    assert (
        "&lt;!channel&gt;" in dumped
        and "&lt;@U123&gt;" in dumped
        and "&lt;http://evil.example|bank&gt;" in dumped
    )
    assert (
        "](http" not in dumped or "[bank](http://evil.example)" in dumped
    )  # markdown links are not links in mrkdwn
    mrkdwn = [obj for obj in walk(value) if obj.get("type") == "mrkdwn"]
    assert mrkdwn and all(obj.get("verbatim") is True for obj in mrkdwn)  # no auto-parsing of @here, #channel


def walk(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value] + [d for v in value.values() for d in walk(v)]
    if isinstance(value, list):
        return [d for v in value for d in walk(v)]
    return []


def mentions(value: Any) -> set[str]:
    return set(re.findall(r"<@([UW][A-Z0-9]+)>", json.dumps(value)))


# ------------------------------------------------------------------------------------------------
# Escaping


def test_card_escapes_customer_text_and_pings_only_our_expert(policy: Policy) -> None:
    built = card(policy)
    assert_customer_text_inert(built)
    assert mentions(built) == {"U0MARIA01"}  # the proposed owner (on duty): an intended ping
    assert "&amp; *bold*" in json.dumps(built, ensure_ascii=False)
    assert_within_slack_limits(built)


def test_customer_name_and_handle_are_escaped_too(policy: Policy) -> None:
    conv = conversation(author_name="<!here> & co", author_handle="<@U123>")
    built = card(policy, conv)
    dumped = json.dumps(built)
    assert "<!here" not in dumped and "<@U123" not in dumped
    assert "&lt;!here&gt; &amp; co" in dumped and "@&lt;@U123&gt;" in dumped
    text = blocks.card_text(conv, post(), ctx_policy=policy, now=MONDAY, tz=BERLIN)
    assert "<!" not in text and "<@" not in text and len(text) <= 300


def test_every_thread_and_dm_message_keeps_customer_text_inert(policy: Policy) -> None:
    conv = conversation(author_name="<!channel>", author_handle="<@U123>")
    nasty = post()
    common: dict[str, Any] = {"ctx_policy": policy, "now": MONDAY, "tz": BERLIN}
    built = [
        blocks.warning_message(conv, **common),
        blocks.breach_message(conv, **common),
        blocks.nag_message(conv, nasty, **common),
        blocks.nag_message(conv, nasty, in_thread=True, **common),
        blocks.escalation_message(
            conv, nasty, notify="team_channel", in_thread=True, team_label="Billing", **common
        ),
        blocks.escalation_message(conv, nasty, notify="manager", team_label="Billing", **common),
        blocks.escalation_message(conv, nasty, notify="owner", team_label="Billing", **common),
        blocks.reassign_message(conv, ctx_policy=policy, now=MONDAY, owner="lee", previous_owner="maria"),
        blocks.thread_post_message(conv, nasty, ctx_policy=policy, now=MONDAY),
        blocks.delivery_problem_message(
            conv, kind="reply", problem="delivery_unknown", text=NASTY, error="<!here>"
        ),
        blocks.admin_alert_message(NASTY, account="<!here>"),
        blocks.storm_summary("#billing", [conv]),
        blocks.storm_entry(conv, nasty, **common),
        blocks.thread_note(NASTY),
    ]
    for message in built:
        dumped = json.dumps([message.text, message.blocks])
        assert "<!channel" not in dumped and "<!here" not in dumped and "<@U123" not in dumped, message.text
        assert "<http://evil" not in dumped
        assert mentions(message.blocks) <= {"U0MARIA01", "U0LEE0001"}
        assert_within_slack_limits(message.blocks)
        assert len(message.text) <= 300


def test_only_http_links_become_links(policy: Policy) -> None:
    weird = "https://social.example/a?x=1&y=<2>|label more"
    built = json.dumps(card(policy, the_post=post("hello", url=weird)))
    assert "<https://social.example/a?x=1&amp;y=%3C2%3E%7Clabel%20more|View the original>" in built
    for bad in ("javascript:alert(1)", "data:text/html,hi", "ftp://files.example/x", "//no-scheme.example"):
        dumped = json.dumps(card(policy, the_post=post("hello", url=bad)))
        assert "View the original" not in dumped and "javascript" not in dumped


# ------------------------------------------------------------------------------------------------
# Limits


def test_four_thousand_characters_of_emoji_stay_within_limits_and_whole(policy: Policy) -> None:
    clusters = [MIXED_EMOJI[i % len(MIXED_EMOJI)] for i in range(1400)]
    raw = "".join(clusters)
    assert len(raw) >= 4000
    for compact in (False, True):
        built = card(policy, the_post=post(raw), compact=compact)
        assert_within_slack_limits(built)
        quoted = built[0]["text"]["text"].split("\n")[1] if compact else built[1]["text"]["text"]
        shown = quoted.removeprefix("> ")
        assert shown.endswith(blocks.ELLIPSIS)
        visible = (
            shown[: -len(blocks.ELLIPSIS)].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        )
        # The cut falls between whole emoji sequences: the shown text is a whole number of clusters.
        count = 0
        rebuilt = ""
        while len(rebuilt) < len(visible):
            rebuilt += clusters[count]
            count += 1
        assert rebuilt == visible
    modal = blocks.reply_modal(conversation(), post(raw), max_length=280)
    assert_within_slack_limits(modal["blocks"], max_blocks=100)


def test_forty_thousand_characters_are_cut_without_breaking_an_entity(policy: Policy) -> None:
    raw = ("a&b<c>" * 7000)[:40000]
    built = card(policy, the_post=post(raw))
    assert_within_slack_limits(built)
    dumped = json.dumps(built)
    assert "Cut for Slack: the post has 40,000 characters." in dumped
    assert blocks.ELLIPSIS.encode("unicode_escape").decode() in dumped
    assert len(built) <= 7
    one_line = card(policy, the_post=post("x\n" * 20000))  # many short lines: cut by lines too
    assert_within_slack_limits(one_line)
    assert one_line[1]["text"]["text"].count("\n") < blocks.MAX_POST_LINES


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(
        st.one_of(st.sampled_from([*MIXED_EMOJI, ">", "\n", "\r\n", "\u200d"]), st.characters()), max_size=300
    ).map("".join),
    limit=st.integers(min_value=8, max_value=600),
)
def test_clip_escaped_property(text: str, limit: int) -> None:
    clipped = blocks.clip_escaped(text, limit)
    text = blocks.normalise_line_breaks(text)  # every line break is a "\n" once shown (issue 11)
    assert units(clipped) <= limit
    assert_entities_whole(clipped)
    if clipped == escape_mrkdwn(text):
        return
    assert clipped.endswith(blocks.ELLIPSIS)
    shown = clipped[: -len(blocks.ELLIPSIS)].replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert text.startswith(shown)
    pieces = list(blocks.graphemes(text))
    assert "".join(pieces) == text
    boundaries = {0}
    for piece in pieces:
        boundaries.add(max(boundaries) + len(piece))
    assert len(shown) in boundaries  # cut between graphemes


@settings(max_examples=500, deadline=None)
@given(
    text=st.lists(
        st.one_of(
            st.sampled_from([*MIXED_EMOJI, ">", "&", "\n", "\r\n", "\u2028", "\u200d"]), st.characters()
        ),
        max_size=120,
    ).map("".join),
    limit=st.integers(min_value=8, max_value=200),
    max_lines=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    quote=st.booleans(),
)
def test_clip_escaped_fast_path_is_the_walk(
    text: str, limit: int, max_lines: int | None, quote: bool
) -> None:
    """A text that fits whole skips the grapheme walk; the result is the walk's, to the character."""
    normalised = blocks.normalise_line_breaks(text)
    walked = blocks._clip_walk(
        normalised, limit - len(blocks.ELLIPSIS), "> " if quote else "", max_lines=max_lines, quote=quote
    )
    assert blocks.clip_escaped(text, limit, max_lines=max_lines, quote=quote) == walked


def test_graphemes_keep_emoji_sequences_whole() -> None:
    assert list(blocks.graphemes("".join(MIXED_EMOJI) + "\r\nx")) == [*MIXED_EMOJI, "\r\n", "x"]


# ------------------------------------------------------------------------------------------------
# The card's content and actions


def test_buttons_carry_the_conversation_id_and_menus_use_the_shared_ids(policy: Policy) -> None:
    built = card(policy)
    actions = [b for b in built if b["type"] == "actions"]
    assert len(actions) == 1
    assert blocks.conversation_id_from_block_id(actions[0]["block_id"]) == 42
    by_id = {e["action_id"]: e for e in elements(built)}
    assert set(by_id) == {
        ACTION_CLAIM,
        ACTION_REASSIGN,
        ACTION_REPLY,
        ACTION_SNOOZE,
        ACTION_ANSWERED,
        ACTION_WAIT,
        ACTION_CLOSE,
    }
    assert all(e["value"] == "42" for e in by_id.values() if e["type"] == "button")
    assert by_id[ACTION_REASSIGN]["type"] == "users_select"
    assert [o["value"] for o in by_id[ACTION_SNOOZE]["options"]] == list(SNOOZE_CHOICES)
    assert [o["value"] for o in by_id[ACTION_CLOSE]["options"]] == list(CLOSE_REASONS)
    claimed = card(policy, conversation(claimed_by="maria"))
    assert {e["action_id"] for e in elements(claimed)} >= {ACTION_UNCLAIM}
    assert ACTION_CLAIM not in {e["action_id"] for e in elements(claimed)}
    assert "Claimed by <@U0MARIA01>" in json.dumps(claimed)


def test_deadline_in_words_and_as_a_date_token(policy: Policy) -> None:
    dumped = json.dumps(card(policy), ensure_ascii=False)
    due = int((MONDAY + timedelta(hours=3, minutes=20)).timestamp())
    assert "due in 3 h 20 min" in dumped
    assert f"<!date^{due}^{{date_short_pretty}} {{time}}|Mon 23 Nov 12:20 CET>" in dumped
    assert "(proposed)" in dumped and "*high*" in dumped and ":large_green_circle: Open" in dumped
    overdue = json.dumps(card(policy, conversation(due_at=MONDAY - timedelta(minutes=25))))
    assert "overdue by 25 min" in overdue and "*Overdue* by 25 min" in overdue


def test_off_duty_owner_is_named_not_pinged(policy: Policy) -> None:
    night = datetime(2026, 11, 23, 23, 0, tzinfo=ZoneInfo("UTC"))
    built = blocks.conversation_card(conversation(), post(), ctx_policy=policy, now=night, tz=BERLIN)
    assert mentions(built) == set()
    assert "*Maria Keller* (off duty) (proposed)" in json.dumps(built)


def test_answered_and_closed_cards_show_the_outcome_without_actions(policy: Policy) -> None:
    answered = conversation(
        status="answered",
        answered_at=MONDAY + timedelta(minutes=42),
        first_response_at=MONDAY + timedelta(minutes=42),
        answered_by="expert:lee",
    )
    built = card(policy, answered)
    assert not [b for b in built if b["type"] == "actions"]
    dumped = json.dumps(built)
    assert "Answered by *Lee Wong* after 42 min (in time)" in dumped
    late = card(
        policy,
        conversation(
            status="answered", answered_at=MONDAY + timedelta(hours=4), answered_by="account:acme_support"
        ),
    )
    assert "Answered by our account @acme_support after 4 h (40 min late)" in json.dumps(late)
    closed = card(policy, conversation(status="closed", close_reason="spam", closed_at=MONDAY))
    assert not [b for b in closed if b["type"] == "actions"]
    assert "Closed: Spam" in json.dumps(closed)
    odd = card(policy, conversation(status="closed", close_reason="<!here> because"))
    assert "Closed: &lt;!here&gt; because" in json.dumps(odd)
    for compact in (True, False):
        assert not elements(card(policy, answered, compact=compact))


def test_reply_modal(policy: Policy) -> None:
    modal = blocks.reply_modal(conversation(), post(), max_length=280)
    assert modal["type"] == "modal" and modal["callback_id"] == VIEW_REPLY
    assert modal["private_metadata"] == "42"
    assert len(modal["title"]["text"]) <= 24 and len(modal["submit"]["text"]) <= 24
    field = next(b for b in modal["blocks"] if b["type"] == "input")
    assert field["block_id"] == REPLY_BLOCK
    assert field["element"]["action_id"] == REPLY_INPUT
    assert field["element"]["multiline"] is True and field["element"]["max_length"] == 280
    assert_customer_text_inert(modal["blocks"])
    assert (
        blocks.reply_modal(conversation(), post(), max_length=10**6)["blocks"][-1]["element"]["max_length"]
        == 3000
    )


def test_storm_summary_counts_and_lists() -> None:
    many = [conversation(id=i, priority="urgent" if i % 4 == 0 else "normal") for i in range(1, 15)]
    summary = blocks.storm_summary("#care", many)
    assert summary.text == "14 new mentions, 3 urgent"
    assert "#1 " in summary.blocks[1]["text"]["text"] and "#14 " in summary.blocks[1]["text"]["text"]
    huge = [conversation(id=i, author_name="N" * 200) for i in range(1, 400)]
    assert_within_slack_limits(blocks.storm_summary("C0CARE0001", huge).blocks)
    assert "<#C0CARE0001>" in blocks.storm_summary("C0CARE0001", huge).blocks[0]["text"]["text"]


def test_digests_of_more_conversations_than_blocks_say_how_many_more_within_slacks_limit(
    policy: Policy,
) -> None:
    """A reminder or follow-up digest given more conversations than a message has blocks for shows
    as many as fit after its headline, keeps the last block for "…and N more", never over 50."""
    items = [conversation(id=100 + i) for i in range(60)]
    reminder = blocks.reminder_digest(
        [blocks.OverdueItem(c, post(f"question {c.id}"), BERLIN, "nag") for c in items], now=MONDAY
    )
    follow_ups = blocks.follow_up_digest(
        [(c, [post(f"again {c.id}")]) for c in items], ctx_policy=policy, now=MONDAY
    )
    for message in (reminder, follow_ups):
        assert len(message.blocks) == blocks.MAX_BLOCKS
        assert "and 12 more" in message.blocks[-1]["text"]["text"]
    assert "60 conversations are waiting" in reminder.text
    assert follow_ups.text == "60 customers wrote again"
    exact = blocks.reminder_digest(
        [blocks.OverdueItem(c, post(), BERLIN, "nag") for c in items[:49]], now=MONDAY
    )
    assert len(exact.blocks) == blocks.MAX_BLOCKS and "more" not in exact.blocks[-1]["text"]["text"]
