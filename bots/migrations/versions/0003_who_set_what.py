"""Who set what: settings remember their setter, so an admin cannot undo an owner's decision.

`chats.set_by` maps each per-chat setting (model, system_prompt, ..., allowed) to the user
key that last set it; `budgets.set_by` is the user key that set the budget. Roles already
keep `granted_by`. `chats.control` is the per-chat rule for who may stop other people's
replies and reset a shared conversation ("admins" | "everyone"; NULL: the configured default).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Frozen on purpose: it spells out every column instead of importing `bots.store`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chats") as batch:
        batch.add_column(sa.Column("set_by", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("control", sa.String(16), nullable=True))
    with op.batch_alter_table("budgets") as batch:
        batch.add_column(sa.Column("set_by", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("budgets") as batch:
        batch.drop_column("set_by")
    with op.batch_alter_table("chats") as batch:
        batch.drop_column("control")
        batch.drop_column("set_by")
