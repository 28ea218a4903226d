"""the outbox's reminder lane: an index of pending rows by kind and due time; nags lend no urgency

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 11:40:00

Nags keep no place in their conversation's order any more and the send loop claims them in a
lane of their own (bot.flow.outbox: customer, staff and reminder lanes take turns), so that in a
storm of urgent rows for rate-limited channels a reminder by DM still goes within seconds. That
claim reads the pending nags due first: a partial index on (kind, next_attempt_at) of pending rows
keeps it a short index range however many other rows are pending (the digests that gather rows of
a kind use it too). Nags written before took the urgency
of a breach or escalation written after them; they go back to a nag's own.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index(
            'ix_outbox_pending_kind',
            ['kind', 'next_attempt_at'],
            unique=False,
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )
    op.execute("UPDATE outbox SET urgency = 6 WHERE kind = 'nag' AND status IN ('pending', 'sending')")


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(
            'ix_outbox_pending_kind',
            postgresql_where=sa.text("status = 'pending'"),
            sqlite_where=sa.text("status = 'pending'"),
        )
