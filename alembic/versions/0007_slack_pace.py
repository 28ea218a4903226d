"""Slack pacing shared between processes: the slack_pace table

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 06:20:00
"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('slack_pace',
    sa.Column('method', sa.String(length=60), nullable=False),
    sa.Column('channel', sa.String(length=100), nullable=False),
    sa.Column('tat', sa.Double(), nullable=False),
    sa.Column('tail', sa.Double(), nullable=False),
    sa.Column('urgent_tail', sa.Double(), nullable=False),
    sa.Column('same_as', sa.String(length=100), nullable=True),
    sa.PrimaryKeyConstraint('method', 'channel', name=op.f('pk_slack_pace'))
    )


def downgrade() -> None:
    op.drop_table('slack_pace')
