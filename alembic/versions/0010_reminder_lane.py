"""nags lend and borrow no urgency: pending ones get a nag's own back

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 11:40:00

Nags keep no place in their conversation's order any more (storage.models.LANE_FREE_KINDS) and
the send loop claims them in a lane of their own, by their urgency (always a nag's own, 6) through
ix_outbox_urgency. Nags written before took the urgency of a breach or escalation written after
them; the ones not yet sent go back to a nag's own, or the reminder lane would never see them.
"""
from collections.abc import Sequence

from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE outbox SET urgency = 6 WHERE kind = 'nag' AND status IN ('pending', 'sending')")


def downgrade() -> None:
    pass  # the urgency a nag borrowed is not known any more; a nag's own is right either way
