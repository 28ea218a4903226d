"""Slack identifiers shared by the Block Kit builders and the listeners that handle them.

Every interactive element carries the conversation id as its `value` (buttons) or in the
view's `private_metadata` (modals), so a handler needs nothing else to find its row.
"""

from __future__ import annotations

import re

# Card buttons and menus (block_actions).
ACTION_CLAIM = "claim"
ACTION_UNCLAIM = "unclaim"
ACTION_REASSIGN = "reassign"  # users_select; value of the selected user is `selected_user`
ACTION_REPLY = "reply"  # opens the reply modal
ACTION_SNOOZE = "snooze"  # static_select; option values are durations ("30m", "1h", "4h") or "tomorrow"
ACTION_ANSWERED = "mark_answered"
ACTION_WAIT = "wait_on_customer"
ACTION_CLOSE = "close"  # static_select; option values are close reasons below

CLOSE_REASONS = {
    "spam": "Spam",
    "no_reply_needed": "No reply needed",
    "duplicate": "Duplicate",
    "answered_elsewhere": "Answered elsewhere",
}
SNOOZE_CHOICES = {"30m": "30 minutes", "1h": "1 hour", "4h": "4 hours", "tomorrow": "Tomorrow morning"}

# Modals (view_submission).
VIEW_REPLY = "reply_modal"  # private_metadata = conversation id
REPLY_BLOCK = "reply_text"
REPLY_INPUT = "text"

# Slash command.
COMMAND = "/replyclock"


_CONVERSATION_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and below 2**63


def parse_conversation_id(value: object) -> int | None:
    """A conversation id from a payload string (``"42"``, surrounding spaces allowed), else None.

    Anything else (a number in another script such as ``"²"`` that ``str.isdigit`` accepts, a
    string too long for a 64-bit id, a dict where a string belongs) is None, never an exception.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    return int(text) if _CONVERSATION_ID.fullmatch(text) else None
