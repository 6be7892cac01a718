"""Estimated usage: how many of a usage row's tokens are parley's estimate, not the provider's report.

A turn stopped mid-stream (/stop, an interrupting message, a dropped connection, a
shutdown) ends before the provider reports what it used, yet the provider billed the
prompt and what it generated. Such turns were booked as 0 tokens, so /usage and daily
budgets undercounted. They are now booked with an estimate, and `estimated_tokens` says
how many of the row's prompt + completion tokens are estimated (0: all reported), so
/usage can mark those numbers as approximate. Existing rows were all reported: 0.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("estimated_tokens", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("estimated_tokens")
