"""a partial index of storm-summary events by time

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 13:05:00

Every new card asks whether a storm summary was posted in the last day (``action = 'slack_storm'``
and ``at`` since then). With no index on events that was a scan of the whole audit trail per card,
growing with the years of events kept. A partial index on (at) of those events alone answers it
from a few index entries and costs other events' inserts nothing.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(
            'ix_events_storm',
            ['at'],
            unique=False,
            postgresql_where=sa.text("action = 'slack_storm'"),
            sqlite_where=sa.text("action = 'slack_storm'"),
        )


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(
            'ix_events_storm',
            postgresql_where=sa.text("action = 'slack_storm'"),
            sqlite_where=sa.text("action = 'slack_storm'"),
        )
