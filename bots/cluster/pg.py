"""Where the cluster's PostgreSQL is, and dedicated connections for coordination.

The store talks to PostgreSQL through a SQLAlchemy pool, which is right for queries but
wrong for coordination: a session advisory lock belongs to one connection, and a pool
hands connections around and pings them behind the scenes. So coordination opens its
own asyncpg connections, from the same store URL, and names them
(`application_name = parley:<replica id>`) so that `pg_stat_activity` -- and `/status` --
can tell which replica holds what.

Advisory locks and NOTIFY channels are per *database*, while parley's `?schema=` lets
several deployments share one database: every lock and channel name therefore carries the
schema (`lock_name`, `inbox_channel`). procrastinate (psycopg) wants the same database as a
plain libpq URL with the schema as `options` (`url`, `options`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from bots.store import PG_CONNECT_TIMEOUT_S, resolve_url

APP_PREFIX = "parley:"
"""`application_name` of a coordination connection: this prefix, then the replica id."""

APP_NAME_MAX = 63
"""PostgreSQL keeps at most NAMEDATALEN-1 bytes of `application_name` (longer ones are cut)."""

# The server drops a coordinating session whose client went silent (lost network, frozen
# process), which frees its locks for another replica: keepalives catch a dead peer, the
# idle-session timeout a live socket to a client that no longer talks. The holder of a
# lock talks every couple of seconds, so these only fire when it cannot.
KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "3",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "6000",  # ms: data the client does not acknowledge
}


@dataclass(frozen=True, slots=True)
class PgTarget:
    """Where and how to connect, from a store URL (`postgresql://...?schema=...`)."""

    params: dict[str, Any]  # asyncpg.connect keyword arguments (no secrets are logged from here)
    schema: str  # "" when the URL names none (the database's default search path)
    connect_timeout: float
    url: str = ""  # libpq form for psycopg (procrastinate), password included: never log it

    @property
    def options(self) -> str:
        """libpq `options` putting the schema first on the search_path ("" without one)."""
        return f"-c search_path={self.schema}" if self.schema else ""

    @property
    def scope(self) -> str:
        """The database and schema, e.g. `parley/public`: what keys elsewhere (Redis) are scoped by."""
        return f"{self.params.get('database') or ''}/{self.schema or 'public'}"

    @property
    def inbox_channel(self) -> str:
        """The NOTIFY channel on which replicas announce new messages of a conversation."""
        return f"parley_inbox_{self.schema or 'public'}"

    @property
    def press_channel(self) -> str:
        """The NOTIFY channel on which a button press is passed to the replica it is for."""
        return f"parley_press_{self.schema or 'public'}"

    def lock_name(self, kind: str, what: str) -> str:
        """`parley.<kind>:<schema>:<what>`: an advisory-lock name unique to this deployment
        (like the store's `parley.migrate:<schema>`)."""
        return f"parley.{kind}:{self.schema}:{what}"


def pg_target(url: str) -> PgTarget:
    """The connection parameters for a PostgreSQL store URL (raises `ConfigError` like the store)."""
    resolved = resolve_url(url)  # validates the URL and the schema name the same way the store does
    if resolved.get_backend_name() != "postgresql":
        raise ValueError("cluster coordination needs a PostgreSQL store")
    schema = make_url(url).query.get("schema") or ""
    query = dict(resolved.query)
    params: dict[str, Any] = {
        "host": resolved.host,
        "port": resolved.port,
        "user": resolved.username,
        "password": resolved.password,
        "database": resolved.database,
    }
    if "ssl" in query:
        params["ssl"] = query["ssl"]
    timeout = float(query.get("timeout", PG_CONNECT_TIMEOUT_S))  # type: ignore[arg-type]
    libpq_query = {k: v for k, v in query.items() if k not in ("timeout", "ssl")}
    if "ssl" in query:
        libpq_query["sslmode"] = query["ssl"]
    libpq = resolved.set(drivername="postgresql", query=libpq_query).render_as_string(hide_password=False)
    return PgTarget({k: v for k, v in params.items() if v is not None}, str(schema), timeout, libpq)


def application_name(replica_id: str) -> str:
    """`parley:<replica id>`, cut to what PostgreSQL keeps."""
    return (APP_PREFIX + replica_id)[:APP_NAME_MAX]


async def connect(target: PgTarget, replica_id: str, **settings: str) -> asyncpg.Connection:
    """A dedicated connection named after the replica, with the keepalive settings above."""
    server_settings = {"application_name": application_name(replica_id), **KEEPALIVE_SETTINGS, **settings}
    if target.schema:
        server_settings["search_path"] = target.schema
    return await asyncpg.connect(
        **target.params,
        timeout=target.connect_timeout,
        server_settings=server_settings,
        statement_cache_size=0,  # a handful of tiny statements; nothing worth preparing
    )


@contextlib.asynccontextmanager
async def cluster_lock(target: PgTarget, what: str, replica_id: str, *, wait: float = 30.0) -> AsyncIterator[None]:
    """Hold the cluster-wide advisory lock `parley.once:<schema>:<what>` (waiting up to `wait` s for it).

    A session lock on a short-lived connection of its own: closing the connection
    releases it, so a replica that dies inside the block cannot keep it.
    """
    conn = await connect(target, replica_id, lock_timeout=str(int(wait * 1000)))
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", target.lock_name("once", what))
        yield
    finally:
        await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    """Close politely (the server frees the session's locks at once); give up after a second."""
    try:
        await conn.close(timeout=1.0)
    except Exception:
        conn.terminate()
