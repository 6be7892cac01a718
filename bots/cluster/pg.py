"""Where the cluster's PostgreSQL is, as the libraries other than SQLAlchemy want it.

The store's URL (`store:`) may carry parley's own `?schema=` (a PostgreSQL schema used as
search_path) and asyncpg's spelling `?ssl=`; procrastinate (psycopg) and the dedicated
connections of the cluster (asyncpg) need a plain libpq URL and the search_path apart.
Advisory locks and NOTIFY channels belong to the whole database, so their names carry
the schema: two deployments (or two tests) in one database never share them.
"""

from __future__ import annotations

from dataclasses import dataclass

from bots.store import _resolve


@dataclass(frozen=True, slots=True)
class PgTarget:
    url: str  # libpq form, password included: never log it (see `bots.store.redact_url`)
    schema: str | None

    @classmethod
    def from_store_url(cls, store_url: str) -> "PgTarget":
        target = _resolve(store_url)
        url = target.url.set(drivername="postgresql")
        query = dict(url.query)
        if "ssl" in query:
            query["sslmode"] = query.pop("ssl")
        query.pop("timeout", None)
        return cls(url.set(query=query).render_as_string(hide_password=False), target.schema)

    @property
    def options(self) -> str:
        """libpq `options` putting the schema first on the search_path ("" without one)."""
        return f"-c search_path={self.schema}" if self.schema else ""

    @property
    def scope(self) -> str:
        """The database and schema, e.g. `parley/public`: what keys elsewhere (Redis) are scoped by."""
        from sqlalchemy.engine import make_url

        return f"{make_url(self.url).database or ''}/{self.schema or 'public'}"

    def name(self, what: str) -> str:
        """A database-wide name (lock, channel) for `what`, scoped to the schema."""
        return f"parley.{what}:{self.schema or 'public'}"

    @property
    def press_channel(self) -> str:
        """The NOTIFY channel on which a button press is passed to the replica it is for."""
        return f"parley_press_{self.schema or 'public'}"

    @property
    def inbox_channel(self) -> str:
        """The NOTIFY channel on which replicas announce new messages of a conversation."""
        return f"parley_inbox_{self.schema or 'public'}"
