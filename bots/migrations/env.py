"""alembic environment for parley.

Normally `Store.open` runs migrations and passes its own (async engine's) connection
through `config.attributes["connection"]` via `AsyncConnection.run_sync`, inside a
transaction it holds: this file then only configures the context and runs.

Run by alembic directly (a developer's `command.revision(..., autogenerate=True)` or
`command.upgrade(alembic_config(url), "head")`), it builds parley's own async engine
from the configured URL and does the same through `connection.run_sync`.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context

from bots.store import create_engine, metadata, prepare_for_migration

config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(parley_write=True)  # SQLite: BEGIN IMMEDIATE
            async with connection.begin():
                await prepare_for_migration(connection, url)
                await connection.run_sync(_run)
    finally:
        await engine.dispose()


def _main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic needs a connection or sqlalchemy.url; see bots.migrations.alembic_config")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_with_own_engine(url))


_main()
