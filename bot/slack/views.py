"""Modal submissions: the reply modal sends its text to the customer through the outbox."""

from __future__ import annotations

import json
import logging
from typing import Any

from slack_bolt import Ack, App, BoltContext

from bot.flow import staff
from bot.slack.common import commit, discard, expert_of, replyclock_of, session_of
from bot.slack.ids import REPLY_BLOCK, REPLY_INPUT, VIEW_REPLY, parse_conversation_id

log = logging.getLogger("replyclock.slack.views")

MAX_METADATA_CHARS = 3000  # Slack's own limit on private_metadata


def register(app: App) -> None:
    """Register the modal submission listeners."""
    app.view(VIEW_REPLY)(handle_reply_submission)


def _conversation_id(view: dict[str, Any]) -> int | None:
    """The conversation id from ``private_metadata`` (a bare id, or JSON with ``conversation_id``)."""
    metadata = view.get("private_metadata")
    if not isinstance(metadata, str):
        return None
    found = parse_conversation_id(metadata)
    if found is not None or len(metadata) > MAX_METADATA_CHARS:
        return found
    try:
        decoded = json.loads(metadata)
    except (ValueError, RecursionError):
        return None
    if isinstance(decoded, dict):
        inner = decoded.get("conversation_id")
        return parse_conversation_id(str(inner) if isinstance(inner, int) else inner)
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _reply_text(view: dict[str, Any]) -> str:
    state = _dict(_dict(_dict(view.get("state")).get("values")).get(REPLY_BLOCK))
    value = _dict(state.get(REPLY_INPUT)).get("value")
    return value if isinstance(value, str) else ""


def handle_reply_submission(ack: Ack, view: dict[str, Any], context: BoltContext) -> None:
    """Queue the reply and mark the conversation answered, or show why not in the modal.

    Too long for the channel (or empty, or the conversation was closed meanwhile): the modal
    stays open with the reason under the text box and nothing is stored or sent. Otherwise the
    reply is committed *before* the modal closes, so a closed modal means a queued reply.
    """
    conversation_id = _conversation_id(view)
    if conversation_id is None:
        ack(response_action="errors", errors={REPLY_BLOCK: "This form lost track of its conversation."})
        return
    ctx = replyclock_of(context)
    session = session_of(context)
    try:
        result = staff.reply(
            session, ctx, conversation_id, expert_of(context), _reply_text(view), ctx.clock.now()
        )
        commit(context)
    except staff.StaffError as error:
        discard(context)
        ack(response_action="errors", errors={REPLY_BLOCK: str(error)})
        return
    log.info("reply queued", extra={"conversation_id": conversation_id, "outbox_key": result.outbox_key})
    ack()
