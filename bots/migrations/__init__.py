"""parley's versioned schema migrations, run by `Store.open` — no alembic.ini needed.

Why alembic in code: the schema changes with releases, and a store opened by a newer
parley must bring an older database forward by itself, on SQLite and PostgreSQL
alike. The script directory lives inside the package, so an installed wheel carries
its migrations with it.

For developers writing a new migration (autogenerate compares against
`bots.store.metadata`):

    from alembic import command
    from bots.migrations import alembic_config
    command.revision(alembic_config("sqlite:///data/dev.db"), "add foo", autogenerate=True)

Name the new file `versions/NNNN_<slug>.py` with `revision = "NNNN"`.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An alembic `Config` pointing at this package's scripts.

    `url` (a user-style store URL, see `bots.store.resolve_url`) is only needed when
    alembic itself must connect, e.g. from a developer's `command.revision(...)`;
    `Store.open` hands over its own connection instead.
    """
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if url is not None:
        # ConfigParser interpolates "%": a password containing it must be escaped.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision this parley knows (what `Store.open` migrates to)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - only if the versions directory went missing
        raise RuntimeError(f"no migrations found under {SCRIPT_LOCATION}")
    return head


def upgrade_to_head(connection: sa.Connection) -> None:
    """Migrate the database behind `connection` to head, inside its open transaction.

    Runs synchronously: call it through `AsyncConnection.run_sync`. On a database
    already at head it only reads the version table.
    """
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def current_revision(connection: sa.Connection) -> str | None:
    """The revision recorded in the database (None for an empty database)."""
    return MigrationContext.configure(connection).get_current_revision()
