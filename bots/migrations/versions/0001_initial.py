"""Initial schema: updates, chats, sessions, turns, messages, usage, users, roles, budgets.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Frozen on purpose: it spells out every column instead of importing `bots.store`,
so later changes to the live table definitions cannot rewrite history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Autoincrement ids: BIGINT on PostgreSQL; SQLite needs exactly INTEGER PRIMARY KEY for rowid ids.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "processed_updates",
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("update_id", sa.String(128), nullable=False),
        sa.Column("seen_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("platform", "update_id", name="pk_processed_updates"),
    )
    op.create_index("ix_processed_updates_seen_at", "processed_updates", ["seen_at"])

    op.create_table(
        "chats",
        sa.Column("chat_key", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("system_prompt", sa.Text(), nullable=True),
        sa.Column("busy_policy", sa.String(32), nullable=True),
        sa.Column("streaming", sa.Boolean(), nullable=True),
        sa.Column("allowed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("chat_key", name="pk_chats"),
    )

    op.create_table(
        "sessions",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("session_key", sa.String(255), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.UniqueConstraint("session_key", "number", name="uq_sessions_session_key_number"),
    )

    op.create_table(
        "turns",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("session_id", _ID, nullable=False),
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("update_id", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_turns_session_id_sessions", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_turns_session_id_id", "turns", ["session_id", "id"])
    op.create_index(
        "ix_turns_running",
        "turns",
        ["id"],
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    )

    op.create_table(
        "messages",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("turn_id", _ID, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("message", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name="fk_messages_turn_id_turns", ondelete="CASCADE"),
        sa.UniqueConstraint("turn_id", "seq", name="uq_messages_turn_id_seq"),
    )

    op.create_table(
        "usage",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("chat_key", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_usage"),
    )
    op.create_index("ix_usage_user_key_created_at", "usage", ["user_key", "created_at"])
    op.create_index("ix_usage_chat_key_created_at", "usage", ["chat_key", "created_at"])
    op.create_index("ix_usage_created_at", "usage", ["created_at"])

    op.create_table(
        "users",
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("username_folded", sa.String(255), nullable=True),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("user_key", name="pk_users"),
    )
    op.create_index("ix_users_platform_username_folded", "users", ["platform", "username_folded"])

    op.create_table(
        "roles",
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("granted_by", sa.String(255), nullable=True),
        sa.Column("granted_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("user_key", name="pk_roles"),
    )
    op.create_index("ix_roles_role", "roles", ["role"])

    op.create_table(
        "budgets",
        sa.Column("user_key", sa.String(255), nullable=False),
        sa.Column("tokens_per_day", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("user_key", name="pk_budgets"),
    )


def downgrade() -> None:
    for table in ("budgets", "roles", "users", "usage", "messages", "turns", "sessions", "chats", "processed_updates"):
        op.drop_table(table)
