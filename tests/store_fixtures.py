"""Store fixtures (a pytest plugin, registered by tests/conftest.py).

- `store`: an open, empty `Store`, once on SQLite and once on PostgreSQL
  (parametrized; test ids end in `[sqlite]` / `[postgres]`). Function-scoped.
- `store_url`: the same parametrization, but only the URL — for tests that open (and
  reopen) stores themselves.
- `sqlite_url`: a fresh SQLite file under the test's tmp_path.
- `postgres_url`: a URL with `?schema=<unique>` on the test PostgreSQL; the schema is
  dropped afterwards, so repeated and parallel runs never collide.

PostgreSQL comes from `PARLEY_TEST_POSTGRES_URL` (default
`postgresql://postgres@127.0.0.1:5432/test`). When it is unreachable the PostgreSQL
cases are skipped with the reason — or fail, when `PARLEY_REQUIRE_POSTGRES` is set (CI).
Select one backend with `-m postgres` / `-m "not postgres"`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from bots.store import Store, redact_url

POSTGRES_URL_ENV = "PARLEY_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "PARLEY_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT_S = 5.0

# The first failure to reach PostgreSQL, so later cases skip at once instead of waiting again.
_unreachable: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"postgres: needs PostgreSQL (${POSTGRES_URL_ENV})")


def _postgres_required() -> bool:
    return os.environ.get(REQUIRE_POSTGRES_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _asyncpg_dsn(url: str) -> str:
    """The plain libpq-style DSN asyncpg understands (no SQLAlchemy driver suffix)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store URL for a file that does not exist yet (its directory neither)."""
    return f"sqlite:///{tmp_path / 'data' / 'parley.db'}"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A store URL in a fresh PostgreSQL schema of its own, dropped after the test."""
    base = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
    reason = _unreachable.get(base)
    admin = None
    if reason is None:
        try:
            admin = await asyncpg.connect(_asyncpg_dsn(base), timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            _unreachable[base] = reason
    if admin is None:
        message = f"PostgreSQL not reachable at {redact_url(base)} ({reason}); set {POSTGRES_URL_ENV}"
        if _postgres_required():
            pytest.fail(f"{message} — required because {REQUIRE_POSTGRES_ENV} is set", pytrace=False)
        pytest.skip(message)
    schema = f"parley_test_{uuid.uuid4().hex[:16]}"
    try:
        yield make_url(base).update_query_dict({"schema": schema}).render_as_string(hide_password=False)
    finally:
        try:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty store, on each backend in turn."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open, empty store on each backend in turn; closed after the test."""
    opened = await Store.open(store_url)
    try:
        yield opened
    finally:
        await opened.close()
