"""parley's persistent state behind one interface: SQLite by default, PostgreSQL by URL.

The store keeps what must survive a restart: chats and their settings, conversation
history, token usage (and the budget holds of running turns), access lists, known users,
and the **inbox**: every accepted
message, stored before the platform is told it arrived, with how far its answer got
(so a crash loses nothing and a redelivered update never produces a second reply). One code path
serves both databases — SQLAlchemy Core over `aiosqlite` or `asyncpg` — and the
schema is migrated to head by alembic every time the store opens.

Every public method is one transaction, written once as a plain function of a
SQLAlchemy `Connection` and run by `Store._run`:

- **SQLite**: on one worker thread of the store's own (`sqlite3` blocks, so a thread is
  the only way to keep it off the event loop), the whole transaction in one hand-off. Through
  `aiosqlite` every statement, BEGIN, COMMIT and pool reset was a hand-off of its own --
  about 9 per transaction -- each waiting for a turn of the event loop, so under load a
  one-row write took 5-10 ms and more (BENCHMARKS.md). The single thread also queues the
  writers of this process in order, so they never wait in SQLite's busy timeout.
- **PostgreSQL**: `asyncpg` through `AsyncConnection.run_sync` (each statement is a network
  round trip anyway).

SQLite transactions that write start with `BEGIN IMMEDIATE`, so a read-then-write can
never fail half-way with "database is locked" (SQLite cannot upgrade a WAL read snapshot
to a write once another writer has committed); reads use a plain deferred `BEGIN` and
never block. A transaction handed to the worker thread runs to its end even if the
awaiting task is cancelled meanwhile.

Errors: invalid arguments raise `ValueError` (a programming error in the caller);
anything the database does wrong raises `StoreError` (or a subclass), never a raw
SQLAlchemy or driver exception.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from alembic.util import CommandError as AlembicCommandError
from sqlalchemy import event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bots import migrations
from bots.errors import ConfigError, ParleyError

log = logging.getLogger(__name__)

Message = dict[str, Any]
T = TypeVar("T")
WallClock = Callable[[], datetime]
"""Returns the current time, timezone-aware (wall time: unlike `bots.clock.Clock`, not monotonic)."""

ROLES = ("admin", "user", "blocked")
"""Roles the store keeps. Owners come from the configuration only and are never stored."""
BUSY_POLICIES = ("queue", "interrupt")
TURN_RUNNING = "running"
TURN_FINISHED_STATUSES = ("ok", "interrupted", "error")
TURN_SUPERSEDED = "superseded"
"""A finished turn replaced by /retry: kept in the database, no longer part of the conversation."""
INBOX_PENDING = "pending"
"""Stored, not started yet (queued behind a running turn, or not routed yet)."""
INBOX_RUNNING = "running"
"""A turn for it is running (or was, when a process died)."""
INBOX_UNFINISHED = (INBOX_PENDING, INBOX_RUNNING)
INBOX_FINISHED = ("answered", "stopped", "failed", "expired", "ignored")
"""answered: completely; stopped: by someone (/stop, an interrupting message, shutdown);
failed: answered with a failure line; expired: too old after a restart, the sender was
asked to resend; ignored: nothing was owed (group chatter, an empty message)."""
INBOX_STATUSES = (*INBOX_UNFINISHED, *INBOX_FINISHED)
CHAT_SETTING_FIELDS = ("model", "system_prompt", "busy_policy", "streaming", "allowed", "control")
CONTROL_POLICIES = ("admins", "everyone")
"""Who may stop other people's replies and reset a group's shared conversation."""

SQLITE_BUSY_TIMEOUT_MS = 5000
"""How long a SQLite writer waits for another writer's lock before failing."""
PG_CONNECT_TIMEOUT_S = 10.0
"""How long to wait for a PostgreSQL connection (override with `?timeout=` in the URL)."""


# --------------------------------------------------------------------------- errors


class StoreError(ParleyError):
    """The database failed or refused an operation (unreachable, locked, constraint)."""


class TurnStateError(StoreError):
    """The turn does not exist, or is not running any more (finished twice?)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ChatSettings:
    """Per-chat overrides; None means "use the configured default"."""

    model: str | None = None
    system_prompt: str | None = None
    busy_policy: str | None = None
    streaming: bool | None = None
    allowed: bool = False  # a group allowed as a whole
    control: str | None = None  # "admins" | "everyone": who stops others' replies, resets the conversation
    set_by: Mapping[str, str] = field(default_factory=dict)  # setting -> user key that set it last


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange: the user message (first) and whatever the model and tools added."""

    id: int
    status: str  # "running" | "ok" | "interrupted" | "error" | "superseded"
    messages: list[Message]
    created_at: datetime
    user_key: str = ""
    update_id: str | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to put into the inbox (see `Store.accept`)."""

    platform: str
    update_id: str
    chat_key: str
    user_key: str
    inbound: dict[str, Any]  # JSON-able


@dataclass(frozen=True, slots=True)
class InboxRow:
    """An inbox entry: one accepted message and how far its answer got."""

    id: int
    platform: str
    update_id: str
    chat_key: str
    user_key: str
    inbound: dict[str, Any]
    status: str  # see INBOX_STATUSES
    attempts: int
    turn_id: int | None
    reply: dict[str, Any] | None
    received_at: datetime
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """One turn's token usage, booked with the turn (see `Store.finish_turn`)."""

    user_key: str
    chat_key: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: float | None
    estimated_tokens: int = 0  # how many of prompt + completion are parley's estimate, not the provider's report


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Token usage of one model summed over a period; `cost` is None when no price was known.

    `estimated`: how many of `prompt + completion` are estimates (turns cut off before
    the provider reported their usage), so /usage can say which numbers are approximate.
    """

    model: str
    prompt: int
    completion: int
    reasoning: int
    cost: float | None
    turns: int
    estimated: int = 0


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """What a new turn reserves against its user's daily budget (see `Store.begin_turn`).

    Usage is only known once a turn finished; without a reservation, turns started at
    once in several chats all see the budget unspent and together overspend it many
    times over. `tokens` is the estimate (prompt + completion allowance), `since` the
    start of the budget's day, `ttl` how long the hold counts at most: a process that
    died mid-turn must not block its user for good.
    """

    tokens: int
    since: datetime
    ttl: timedelta


class BudgetRefused(ParleyError):
    """A turn was not started: the user's daily budget has no room left (nothing written).

    Not a `StoreError`: the database worked, and retrying cannot help before tokens are
    released. `spent`: the day's usage alone reached the budget (it resets at midnight
    UTC); otherwise the holds of the user's running turns fill it, and a message sent
    again after they finish may pass.
    """

    def __init__(self, *, budget: int, used: int, held: int) -> None:
        super().__init__(f"daily budget {budget}: {used} used, {held} held by running turns")
        self.budget = budget
        self.used = used
        self.held = held

    @property
    def spent(self) -> bool:
        return self.used >= self.budget


# --------------------------------------------------------------------------- schema


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on both backends.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as
    naive UTC text (which still sorts and compares correctly) and re-tagged on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware values")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Must match migrations/versions/*: tests/test_store.py compares the two.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("id", _ID, autoincrement=True, nullable=False),  # arrival order
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("update_id", sa.String(128), nullable=False),
    sa.Column("chat_key", sa.String(255), nullable=False),
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("inbound", sa.JSON(), nullable=False),  # the whole message (bots.inbound.to_json)
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),  # turns started for it
    sa.Column("turn_id", _ID, nullable=True),  # the latest turn answering it
    sa.Column("reply", sa.JSON(), nullable=True),  # what the chat shows of its answer (bots.live_reply)
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_inbox"),
    sa.UniqueConstraint("platform", "update_id", name="uq_inbox_platform_update_id"),
    sa.Index(
        "ix_inbox_unfinished",
        "id",
        sqlite_where=sa.text("status IN ('pending', 'running')"),
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    ),
    sa.Index("ix_inbox_received_at", "received_at"),
)

chats = sa.Table(
    "chats",
    metadata,
    sa.Column("chat_key", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=True),
    sa.Column("system_prompt", sa.Text(), nullable=True),
    sa.Column("busy_policy", sa.String(32), nullable=True),
    sa.Column("streaming", sa.Boolean(), nullable=True),
    sa.Column("allowed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("set_by", sa.JSON(), nullable=True),  # setting name -> user key that set it last
    sa.Column("control", sa.String(16), nullable=True),  # who stops others' replies: admins | everyone
    sa.PrimaryKeyConstraint("chat_key", name="pk_chats"),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", _ID, autoincrement=True, nullable=False),
    sa.Column("session_key", sa.String(255), nullable=False),
    sa.Column("number", sa.Integer(), nullable=False),  # 1, 2, ... per session_key
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    sa.UniqueConstraint("session_key", "number", name="uq_sessions_session_key_number"),
)

turns = sa.Table(
    "turns",
    metadata,
    sa.Column("id", _ID, autoincrement=True, nullable=False),
    sa.Column("session_id", _ID, nullable=False),
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("update_id", sa.String(128), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint("id", name="pk_turns"),
    sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], name="fk_turns_session_id_sessions", ondelete="CASCADE"),
    sa.Index("ix_turns_session_id_id", "session_id", "id"),
    sa.Index(
        "ix_turns_running",
        "id",
        sqlite_where=sa.text("status = 'running'"),
        postgresql_where=sa.text("status = 'running'"),
    ),
)

turn_messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", _ID, autoincrement=True, nullable=False),
    sa.Column("turn_id", _ID, nullable=False),
    sa.Column("seq", sa.Integer(), nullable=False),  # 0 = the user message
    sa.Column("message", sa.JSON(), nullable=False),  # Chat Completions shape
    sa.PrimaryKeyConstraint("id", name="pk_messages"),
    sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name="fk_messages_turn_id_turns", ondelete="CASCADE"),
    sa.UniqueConstraint("turn_id", "seq", name="uq_messages_turn_id_seq"),
)

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("id", _ID, autoincrement=True, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("chat_key", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("reasoning_tokens", sa.Integer(), nullable=False),
    sa.Column("cost", sa.Float(), nullable=True),
    # Of prompt + completion, the tokens parley estimated (a stream cut before the provider's report).
    sa.Column("estimated_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.PrimaryKeyConstraint("id", name="pk_usage"),
    sa.Index("ix_usage_user_key_created_at", "user_key", "created_at"),
    sa.Index("ix_usage_chat_key_created_at", "chat_key", "created_at"),
    sa.Index("ix_usage_created_at", "created_at"),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("platform", sa.String(32), nullable=False),
    sa.Column("username", sa.String(255), nullable=True),  # as the platform spells it, no "@"
    sa.Column("username_folded", sa.String(255), nullable=True),  # casefolded, for lookups
    sa.Column("display_name", sa.Text(), nullable=True),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("user_key", name="pk_users"),
    sa.Index("ix_users_platform_username_folded", "platform", "username_folded"),
)

roles = sa.Table(
    "roles",
    metadata,
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("granted_by", sa.String(255), nullable=True),
    sa.Column("granted_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("user_key", name="pk_roles"),
    sa.Index("ix_roles_role", "role"),
)

budgets = sa.Table(
    "budgets",
    metadata,
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("tokens_per_day", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("set_by", sa.String(255), nullable=True),  # user key that set the budget
    sa.PrimaryKeyConstraint("user_key", name="pk_budgets"),
)

# Tokens reserved by running turns of users with a budget (see `Store.begin_turn`'s `hold`).
budget_holds = sa.Table(
    "budget_holds",
    metadata,
    sa.Column("turn_id", _ID, nullable=False),
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("tokens", sa.BigInteger(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),  # a dead process's hold stops counting
    sa.PrimaryKeyConstraint("turn_id", name="pk_budget_holds"),
    sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], name="fk_budget_holds_turn_id_turns", ondelete="CASCADE"),
    sa.Index("ix_budget_holds_user_key", "user_key"),
)


tool_approvals = sa.Table(
    "tool_approvals",
    metadata,
    sa.Column("chat_key", sa.String(255), nullable=False),
    sa.Column("tool", sa.String(255), nullable=False),
    sa.Column("approved_by", sa.String(255), nullable=False),
    sa.Column("approved_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("chat_key", "tool", name="pk_tool_approvals"),
)


model_choices = sa.Table(
    "model_choices",
    metadata,
    sa.Column("chat_key", sa.String(255), nullable=False),
    sa.Column("user_key", sa.String(255), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("chosen_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("chat_key", "user_key", name="pk_model_choices"),
)

cluster_state = sa.Table(
    "cluster_state",
    metadata,
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("value", sa.Text(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint("name", name="pk_cluster_state"),
)


_NOTE_REPLY = (
    sa.update(inbox)
    .where(inbox.c.id == sa.bindparam("row"))
    .values(reply=sa.bindparam("reply", type_=inbox.c.reply.type))
)


# --------------------------------------------------------------------------- URLs and engine

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def redact_url(url: str | URL) -> str:
    """The URL with its password masked: the only form of a store URL fit for logs."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except Exception:  # an unparsable URL may still hold a secret: show none of it
        return "<unparsable store URL>"
    return parsed.render_as_string(hide_password=True)


@dataclass(frozen=True, slots=True)
class _Target:
    url: URL  # with the async driver; without our own "schema" parameter
    schema: str | None  # PostgreSQL schema (search_path) to use
    sqlite_path: Path | None  # the database file, for SQLite


def resolve_url(url: str) -> URL:
    """Map a user's store URL to SQLAlchemy's async form, or raise `ConfigError`.

    Accepts `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`,
    `postgresql://user:pw@host[:port]/db` (also `postgres://`), and the explicit
    `+aiosqlite` / `+asyncpg` forms. PostgreSQL URLs may carry `?schema=name` (parley
    keeps its tables there, creating it if needed) and `?sslmode=...` (passed to
    asyncpg as `ssl`).
    """
    return _resolve(url).url


def _resolve(url: str) -> _Target:
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError, but be sure nothing leaks
        raise ConfigError(f"store: not a database URL: {redact_url(url)!r}") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "aiosqlite"):
            raise ConfigError(f"store: SQLite driver {driver!r} is not supported; write sqlite:///path/to/parley.db")
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise ConfigError(
                "store: an in-memory SQLite database cannot be shared by the store's connections; "
                "give a file, e.g. sqlite:///data/parley.db"
            )
        is_uri = str(parsed.query.get("uri", "")).lower() in ("true", "1")
        return _Target(parsed.set(drivername="sqlite+aiosqlite"), None, None if is_uri else Path(database))
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "asyncpg"):
            raise ConfigError(
                f"store: PostgreSQL driver {driver!r} is not supported; write postgresql://user:password@host/db"
            )
        query = dict(parsed.query)
        schema = query.pop("schema", None)
        if isinstance(schema, tuple):
            raise ConfigError("store: give ?schema= once")
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise ConfigError(f"store: schema {schema!r} must be a lowercase identifier ([a-z_][a-z0-9_]*)")
        if "sslmode" in query:  # libpq's spelling; asyncpg calls it "ssl"
            query["ssl"] = query.pop("sslmode")
        if "timeout" in query:
            try:
                float(query["timeout"])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ConfigError(f"store: ?timeout= must be a number of seconds, got {query['timeout']!r}") from None
        return _Target(parsed.set(drivername="postgresql+asyncpg", query=query), schema, None)
    raise ConfigError(
        f"store: unsupported database {parsed.drivername!r} in {redact_url(parsed)!r}; "
        "use sqlite:///path/to/parley.db or postgresql://user:password@host/db"
    )


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """The async engine for a user's store URL, with parley's per-connection setup.

    SQLite: WAL, `synchronous=NORMAL`, `busy_timeout`, `foreign_keys=ON` on every
    connection, and SQLAlchemy (not the sqlite3 module) emits BEGIN — `BEGIN IMMEDIATE`
    for connections marked with the `parley_write` execution option. The database's
    directory is created. PostgreSQL: `search_path` set to `?schema=` when given.
    """
    target = _resolve(url)
    if target.url.get_backend_name() == "sqlite":
        if target.sqlite_path is not None:
            try:
                target.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory of {target.sqlite_path}: {exc}") from exc
        engine = create_async_engine(target.url, echo=echo)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {"server_settings": {"application_name": "parley"}}
    if target.schema is not None:
        connect_args["server_settings"]["search_path"] = target.schema
    # asyncpg would wait 60 s for an unreachable host; the URL's query arrives as text.
    connect_args["timeout"] = float(target.url.query.get("timeout", PG_CONNECT_TIMEOUT_S))  # type: ignore[arg-type]
    return create_async_engine(target.url, echo=echo, pool_pre_ping=True, connect_args=connect_args)


def sqlite_worker_engine(engine: AsyncEngine) -> sa.Engine:
    """A synchronous `sqlite3` engine on the same database file and with the same
    per-connection setup as `engine`, for the store's worker thread."""
    sync = sa.create_engine(
        engine.url.set(drivername="sqlite"),
        echo=engine.echo,
        connect_args={"check_same_thread": False},  # created and used on the worker thread; disposed there too
    )
    event.listen(sync, "connect", _sqlite_on_connect)
    event.listen(sync, "begin", _sqlite_on_begin)
    return sync


async def prepare_for_migration(conn: AsyncConnection, url: str) -> None:
    """`prepare_migration` for an async connection (alembic's env.py runs on one)."""
    await conn.run_sync(prepare_migration, url)


def prepare_migration(conn: sa.Connection, url: str) -> None:
    """Run first in a migrating transaction: serialize migrators, create `?schema=`.

    On PostgreSQL two parley processes starting at once must not both create the
    tables: a transaction-scoped advisory lock makes the second wait and then find the
    schema at head. (SQLite gets the same from the write transaction's BEGIN IMMEDIATE.)
    """
    if conn.dialect.name != "postgresql":
        return
    schema = _resolve(url).schema
    conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"parley.migrate:{schema or ''}"}
    )
    if schema is not None:  # a validated identifier: safe to interpolate
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {schema}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module: it would not BEGIN before SELECTs or DDL.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        mode = cursor.fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("SQLite refused WAL mode (journal_mode=%s); concurrent readers will block", mode)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS:d}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: sa.Connection) -> None:
    write = connection.get_execution_options().get("parley_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


_migration_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _migration_lock() -> asyncio.Lock:
    """One lock per event loop (an asyncio.Lock must not outlive or cross its loop)."""
    loop = asyncio.get_running_loop()
    lock = _migration_locks.get(loop)
    if lock is None:
        lock = _migration_locks[loop] = asyncio.Lock()
    return lock


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _describe(exc: BaseException) -> str:
    """One line about a database error: the driver's message, not SQLAlchemy's SQL dump."""
    orig = getattr(exc, "orig", None) or exc
    first_line = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(orig).__name__}: {first_line}"[:300]


def _strip_nul(text: str) -> str:
    """PostgreSQL text cannot hold NUL characters (SQLite can): drop them on both, alike."""
    return text.replace("\x00", "")


def _strip_nul_json(value: Any) -> Any:
    """`_strip_nul` through a JSON value (strings in dicts and lists)."""
    if isinstance(value, str):
        return _strip_nul(value)
    if isinstance(value, dict):
        return {k: _strip_nul_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul_json(v) for v in value]
    return value


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")


def _require_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _require_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


# --------------------------------------------------------------------------- the store


class Store:
    """parley's database. Open with `await Store.open(url)`, close with `await store.close()`."""

    def __init__(self, engine: AsyncEngine, *, display_url: str, utcnow: WallClock) -> None:
        """Use `Store.open`: it also migrates the schema."""
        self._engine = engine
        self._display_url = display_url
        self._now = utcnow
        self._closed = False
        self._dialect = engine.dialect.name
        # SQLite: whole transactions on one thread of our own (see the module docstring).
        self._sqlite: sa.Engine | None = None
        self._worker: ThreadPoolExecutor | None = None
        if self._dialect == "sqlite":
            self._sqlite = sqlite_worker_engine(engine)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-sqlite")

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, url: str, *, echo: bool = False, utcnow: WallClock = _utcnow) -> Self:
        """Connect, configure the connections and migrate the schema to head.

        `utcnow` returns the current time (timezone-aware) for every timestamp the store
        writes; tests inject a fake one. Raises `ConfigError` for a bad URL and
        `StoreError` when the database cannot be reached or migrated.
        """
        display_url = redact_url(url)
        engine = create_engine(url, echo=echo)
        store = cls(engine, display_url=display_url, utcnow=utcnow)
        try:
            await store._migrate(url)
        except BaseException:
            await engine.dispose()
            raise
        log.info("store open: %s", display_url)
        return store

    async def _migrate(self, url: str) -> None:
        # alembic keeps its running migration in module-global state, so two stores of one
        # process must not migrate interleaved (the database locks only order processes).
        head = migrations.head_revision()

        def migrate(conn: sa.Connection) -> str | None:
            prepare_migration(conn, url)
            before = migrations.current_revision(conn)
            if before == head:
                return before  # the usual case: nothing to do, and no need to load the scripts
            try:
                migrations.upgrade_to_head(conn)
            except AlembicCommandError as exc:  # e.g. a revision only a newer parley knows
                raise StoreError(f"cannot migrate {self._display_url} from revision {before!r}: {exc}") from exc
            return before

        async with _migration_lock():
            before = await self._run("migrate", migrate, write=True)
        if before != head:
            log.info("store schema migrated from %s to %s at %s", before or "empty", head, self._display_url)

    async def close(self) -> None:
        """Release every connection; the store cannot be used afterwards."""
        self._closed = True
        worker, self._worker = self._worker, None  # closing twice is harmless
        if worker is not None:
            assert self._sqlite is not None
            await asyncio.get_running_loop().run_in_executor(worker, self._sqlite.dispose)
            worker.shutdown(wait=False)
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ping(self) -> bool:
        """Readiness: can the database answer a query right now? Never raises."""
        try:
            await self._run("ping", lambda conn: conn.execute(sa.text("SELECT 1")).scalar(), write=False)
        except StoreError as exc:
            log.warning("store ping failed at %s: %s", self._display_url, exc)
            return False
        return True

    async def schema_revision(self) -> str | None:
        """The migration revision the database is at (see `bots.migrations.head_revision`)."""
        return await self._run("schema_revision", migrations.current_revision, write=False)

    async def _run(self, what: str, work: Callable[[sa.Connection], T], *, write: bool) -> T:
        """Run `work(conn)` as one transaction and return its result.

        Database errors become `StoreError`, bad values `ValueError`; a `StoreError` that
        `work` raises itself passes through.
        """
        if self._closed:
            raise StoreError(f"{what}: the store is closed")
        try:
            if self._worker is not None:
                return await asyncio.get_running_loop().run_in_executor(self._worker, self._sqlite_tx, work, write)
            async with self._engine.connect() as conn:
                async with conn.begin():
                    return await conn.run_sync(work)
        except sa.exc.StatementError as exc:
            if not isinstance(exc, sa.exc.DBAPIError) and isinstance(exc.orig, (TypeError, ValueError)):
                # Raised while binding parameters: e.g. a message that is not JSON-serializable.
                raise ValueError(f"{what}: {exc.orig}") from exc
            raise StoreError(f"{what} failed: {_describe(exc)}") from exc
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"{what} failed: {_describe(exc)}") from exc
        except OSError as exc:  # e.g. connection refused, before the driver wraps it
            raise StoreError(f"{what} failed: cannot reach {self._display_url}: {_describe(exc)}") from exc

    def _sqlite_tx(self, work: Callable[[sa.Connection], T], write: bool) -> T:
        """On the worker thread: one SQLite transaction (BEGIN IMMEDIATE when it writes)."""
        assert self._sqlite is not None
        with self._sqlite.connect() as conn:
            if write:
                conn.execution_options(parley_write=True)
            with conn.begin():
                return work(conn)

    def _insert(self, table: sa.Table) -> Any:
        """INSERT with the dialect's ON CONFLICT support (both spell it the same way)."""
        return (pg_dialect.insert if self._dialect == "postgresql" else sqlite_dialect.insert)(table)

    # ---------------------------------------------------------------- the inbox

    async def accept(self, messages: list[NewMessage]) -> list[int | None]:
        """Store messages in the inbox, in order, in one transaction; returns their inbox ids.

        None for a message already stored (a platform redelivered it): the unique
        (platform, update_id) key makes concurrent acceptances of one update see exactly
        one id. Only once this returned may the platform be told the messages arrived.
        """
        if not messages:
            return []
        now = self._now()
        rows = []
        for m in messages:
            _require_text("platform", m.platform)
            _require_text("update_id", m.update_id)
            _require_text("chat_key", m.chat_key)
            _require_text("user_key", m.user_key)
            rows.append(
                {
                    "platform": m.platform,
                    "update_id": m.update_id,
                    "chat_key": m.chat_key,
                    "user_key": m.user_key,
                    "inbound": _strip_nul_json(m.inbound),
                    "status": INBOX_PENDING,
                    "attempts": 0,
                    "received_at": now,
                }
            )
        insert = self._insert(inbox)

        def accept(conn: sa.Connection) -> list[int | None]:
            ids: list[int | None] = []
            for row in rows:
                stmt = (
                    insert.values(**row)
                    .on_conflict_do_nothing(index_elements=["platform", "update_id"])
                    .returning(inbox.c.id)
                )
                found = conn.execute(stmt).scalar()
                ids.append(None if found is None else int(found))
            return ids

        return await self._run("accept", accept, write=True)

    async def note_reply(self, inbox_ids: Iterable[int], reply: dict[str, Any]) -> None:
        """Record what the chat shows of a message's answer (message ids, texts, unsure sends).

        Written before a send (so a crash mid-send leaves the text to look for) and after
        every platform call that changed what is shown; recovery reuses or marks it.
        """
        params = [{"row": inbox_id, "reply": reply} for inbox_id in inbox_ids]
        if params:  # the hot path of every reply: one cached statement, no IN list to expand
            await self._run("note_reply", lambda conn: conn.execute(_NOTE_REPLY, params), write=True)

    async def finish_messages(
        self, inbox_ids: Iterable[int], status: str, *, reply: dict[str, Any] | None = None
    ) -> None:
        """Give inbox messages their final status (and the reply they got, when given)."""
        if status not in INBOX_FINISHED:
            raise ValueError(f"status must be one of {INBOX_FINISHED}, got {status!r}")
        ids = list(inbox_ids)
        if not ids:
            return
        values: dict[str, Any] = {"status": status, "finished_at": self._now()}
        if reply is not None:
            values["reply"] = reply
        stmt = sa.update(inbox).where(inbox.c.id.in_(ids)).values(**values)
        await self._run("finish_messages", lambda conn: conn.execute(stmt), write=True)

    async def revise_message(self, inbox_id: int, inbound: dict[str, Any]) -> bool:
        """Its sender edited a message not answered yet: store the new version over the old.

        The attempts made for the old text no longer count (a crash-loop guard is about
        one question failing again and again; the edit is a new one). False, changing
        nothing, when the message is finished already (the edit came too late).
        """
        stmt = (
            sa.update(inbox)
            .where(inbox.c.id == inbox_id, inbox.c.status.in_(INBOX_UNFINISHED))
            .values(inbound=_strip_nul_json(inbound), attempts=0)
        )
        return await self._run("revise_message", lambda conn: conn.execute(stmt).rowcount == 1, write=True)

    async def unfinished_messages(
        self, platforms: Iterable[str] | None = None, *, chat_key: str | None = None, after: int | None = None
    ) -> list[InboxRow]:
        """Messages not finished yet, oldest first: what an earlier process left to recover.

        `chat_key`: one conversation's only (cluster mode: what the replica taking it over
        finds); `after`: only rows with a larger inbox id (what arrived since).
        """
        query = sa.select(inbox).where(inbox.c.status.in_(INBOX_UNFINISHED)).order_by(inbox.c.id)
        if platforms is not None:
            query = query.where(inbox.c.platform.in_(list(platforms)))
        if chat_key is not None:
            query = query.where(inbox.c.chat_key == chat_key)
        if after is not None:
            query = query.where(inbox.c.id > after)
        rows = await self._run("unfinished_messages", lambda conn: conn.execute(query).all(), write=False)
        return [_inbox_row(row._mapping) for row in rows]

    async def unfinished_chats(self, *, older_than: timedelta = timedelta(0)) -> list[str]:
        """The conversations with unfinished messages received at least `older_than` ago
        (cluster mode: each must have a queued job; a sweep makes sure of it)."""
        cutoff = self._now() - older_than
        query = (
            sa.select(inbox.c.chat_key)
            .where(inbox.c.status.in_(INBOX_UNFINISHED), inbox.c.received_at <= cutoff)
            .group_by(inbox.c.chat_key)
            .order_by(sa.func.min(inbox.c.id))
        )
        rows = await self._run("unfinished_chats", lambda conn: conn.scalars(query).all(), write=False)
        return [str(r) for r in rows]

    async def inbox_backlog(self) -> tuple[int, datetime | None]:
        """Messages waiting for their turn to begin (pending), and when the oldest came."""
        query = sa.select(sa.func.count(), sa.func.min(inbox.c.received_at)).where(inbox.c.status == INBOX_PENDING)
        row = await self._run("inbox_backlog", lambda conn: conn.execute(query).one(), write=False)
        oldest = row[1]
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return int(row[0]), oldest

    async def cluster_value(self, name: str) -> str | None:
        """A fact the replicas of a cluster share (table `cluster_state`), or None."""
        query = sa.select(cluster_state.c.value).where(cluster_state.c.name == name)
        return await self._run("cluster_value", lambda conn: conn.scalar(query), write=False)

    async def set_cluster_value(self, name: str, value: str) -> None:
        """Record a fact the replicas of a cluster share (replacing the old value)."""
        stmt = self._insert(cluster_state).values(name=name, value=value, updated_at=self._now())
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"], set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at}
        )
        await self._run("set_cluster_value", lambda conn: conn.execute(stmt), write=True)

    async def inbox_message(self, inbox_id: int) -> InboxRow | None:
        """One inbox row, or None."""
        query = sa.select(inbox).where(inbox.c.id == inbox_id)
        row = await self._run("inbox_message", lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else _inbox_row(row._mapping)

    async def prune_inbox(self, older_than: timedelta) -> int:
        """Forget finished messages received more than `older_than` ago; returns how many.

        Keep them longer than a platform may redeliver (Telegram keeps updates 24 h): their
        (platform, update_id) key is what recognizes a redelivery.
        """
        cutoff = self._now() - older_than
        stmt = sa.delete(inbox).where(inbox.c.received_at < cutoff, inbox.c.status.in_(INBOX_FINISHED))
        return await self._run("prune_inbox", lambda conn: conn.execute(stmt).rowcount, write=True)

    # ---------------------------------------------------------------- chats

    async def chat_settings(self, chat_key: str) -> ChatSettings:
        """The chat's overrides; all None (and not allowed) for a chat never configured."""
        query = sa.select(chats).where(chats.c.chat_key == chat_key)
        row = await self._run("chat_settings", lambda conn: conn.execute(query).first(), write=False)
        return ChatSettings() if row is None else _chat_settings(row._mapping)

    async def update_chat_settings(self, chat_key: str, *, by: str | None = None, **fields: Any) -> ChatSettings:
        """Set only the given fields (None resets one to the default); returns the result.

        Fields: model, system_prompt, busy_policy ("queue" | "interrupt"), streaming
        (bool), allowed (bool, never None), control ("admins" | "everyone").
        `by` is the user key making the change: remembered per field (`ChatSettings.set_by`)
        so that a lower role cannot undo it; None (configuration, tests) forgets the setter.
        """
        _require_text("chat_key", chat_key)
        unknown = set(fields) - set(CHAT_SETTING_FIELDS)
        if unknown:
            raise ValueError(f"unknown chat settings {sorted(unknown)}; known: {', '.join(CHAT_SETTING_FIELDS)}")
        _validate_chat_fields(fields)
        if isinstance(fields.get("system_prompt"), str):
            fields["system_prompt"] = _strip_nul(fields["system_prompt"])
        if not fields:
            return await self.chat_settings(chat_key)
        now = self._now()

        def work(conn: sa.Connection) -> Any:
            # Read and write in one transaction: two admins changing different settings
            # at once must both be remembered as the setters of their own field.
            current = conn.scalar(sa.select(chats.c.set_by).where(chats.c.chat_key == chat_key)) or {}
            setters = {k: v for k, v in dict(current).items() if k not in fields}
            if by is not None:
                # A reset to the default (None) is no override: nobody's decision to guard.
                setters.update({name: by for name, value in fields.items() if value is not None})
            values = {**fields, "set_by": setters or None}
            stmt = self._insert(chats).values(chat_key=chat_key, updated_at=now, **values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["chat_key"],
                set_={name: stmt.excluded[name] for name in (*values, "updated_at")},
            ).returning(*chats.c)
            return conn.execute(stmt).one()

        row = await self._run("update_chat_settings", work, write=True)
        return _chat_settings(row._mapping)

    # ---------------------------------------------------------------- sessions and history

    async def current_session(self, session_key: str) -> int:
        """The session a new message in `session_key` belongs to; the first is created lazily."""
        _require_text("session_key", session_key)
        latest = self._latest_session(session_key)
        found = await self._run("current_session", lambda conn: conn.scalar(latest), write=False)
        if found is not None:
            return int(found)
        stmt = (
            self._insert(sessions)
            .values(session_key=session_key, number=1, created_at=self._now())
            .on_conflict_do_nothing(index_elements=["session_key", "number"])
        )

        def create(conn: sa.Connection) -> int:
            self._lock_session_key(conn, session_key)
            conn.execute(stmt)  # a concurrent caller may have won: then this is a no-op
            return int(conn.scalar(latest))

        return await self._run("current_session", create, write=True)

    def _lock_session_key(self, conn: sa.Connection, session_key: str) -> None:
        """Serialize session creation per key, so numbering never collides.

        SQLite's write transactions are already serial (BEGIN IMMEDIATE); PostgreSQL takes
        a transaction-scoped advisory lock, after which (READ COMMITTED) the next
        statement sees the sessions a concurrent creator committed.
        """
        if self._dialect == "postgresql":
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"parley.session:{session_key}"}
            )

    @staticmethod
    def _latest_session(session_key: str) -> sa.Select[Any]:
        return (
            sa.select(sessions.c.id)
            .where(sessions.c.session_key == session_key)
            .order_by(sessions.c.number.desc())
            .limit(1)
        )

    async def new_session(self, session_key: str) -> int:
        """Start a fresh conversation (/new); older sessions are kept."""
        _require_text("session_key", session_key)
        next_number = (
            sa.select(sa.func.coalesce(sa.func.max(sessions.c.number), 0) + 1)
            .where(sessions.c.session_key == session_key)
            .scalar_subquery()
        )
        stmt = (
            sa.insert(sessions)
            .values(session_key=session_key, number=next_number, created_at=self._now())
            .returning(sessions.c.id)
        )

        def create(conn: sa.Connection) -> int:
            self._lock_session_key(conn, session_key)
            return int(conn.execute(stmt).scalar_one())

        return await self._run("new_session", create, write=True)

    async def begin_turn(
        self,
        session_id: int,
        *,
        user_message: Message,
        user_key: str,
        update_id: str | None,
        inbox_ids: Iterable[int] = (),
        supersede: Iterable[int] = (),
        hold: BudgetHold | None = None,
    ) -> int:
        """Record a turn's user message before the model is called; the turn is "running".

        Writing first means a crash mid-turn still leaves the question in history (and
        in `running_turns()` for the restart to clean up). The inbox messages it answers
        become "running" with this turn, their attempts counted; `supersede` names
        earlier turns of the same messages (cut off by a crash) that leave the
        conversation now -- all in the same transaction.

        `hold`: when the user has a daily budget, the turn starts only if the tokens used
        since `hold.since` plus those held by the user's running turns are below it, and
        then holds `hold.tokens` until it finishes; otherwise `BudgetRefused` is raised
        and nothing is written. Check and hold are one transaction, serialized per user
        (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock on the user, so several
        processes on one database admit as one), so turns started at once can overspend
        the budget by at most one turn's hold.
        """
        ids = list(inbox_ids)
        old_turns = list(supersede)
        if not isinstance(user_message, dict) or user_message.get("role") != "user":
            raise ValueError(f"user_message must be a dict with role 'user', got {user_message!r:.200}")
        _require_text("user_key", user_key)
        if hold is not None:
            _require_count("hold.tokens", hold.tokens)
            _require_aware("hold.since", hold.since)
        stmt = (
            sa.insert(turns)
            .values(session_id=session_id, user_key=user_key, update_id=update_id, status=TURN_RUNNING, created_at=self._now())
            .returning(turns.c.id)
        )

        def begin(conn: sa.Connection) -> int:
            held = hold is not None and self._admit(conn, user_key, hold)  # raises BudgetRefused
            turn_id = conn.execute(stmt).scalar_one()
            conn.execute(sa.insert(turn_messages).values(turn_id=turn_id, seq=0, message=user_message))
            if held:
                assert hold is not None
                now = self._now()
                conn.execute(
                    sa.insert(budget_holds).values(
                        turn_id=turn_id, user_key=user_key, tokens=hold.tokens, created_at=now, expires_at=now + hold.ttl
                    )
                )
            if ids:
                conn.execute(
                    sa.update(inbox)
                    .where(inbox.c.id.in_(ids))
                    .values(status=INBOX_RUNNING, turn_id=turn_id, attempts=inbox.c.attempts + 1)
                )
            if old_turns:
                conn.execute(
                    sa.update(turns)
                    .where(turns.c.id.in_(old_turns), turns.c.status.in_((TURN_RUNNING, *TURN_FINISHED_STATUSES)))
                    .values(status=TURN_SUPERSEDED, finished_at=sa.func.coalesce(turns.c.finished_at, self._now()))
                )
                conn.execute(sa.delete(budget_holds).where(budget_holds.c.turn_id.in_(old_turns)))
            return int(turn_id)

        return await self._run("begin_turn", begin, write=True)

    async def finish_turn(
        self,
        turn_id: int,
        messages: list[Message],
        *,
        status: str,
        usage: Usage | None = None,
        inbox_ids: Iterable[int] = (),
        inbox_status: str | None = None,
        reply: dict[str, Any] | None = None,
    ) -> None:
        """Append the turn's messages after the user message and set its final status, atomically.

        `messages` are what the turn produced (assistant messages with or without
        tool_calls, tool results), in order; the user message is already stored. In the
        same transaction: the turn's `usage` is booked (replacing its budget hold, if
        any), and the inbox messages it answered get `inbox_status` and the `reply` the
        chat shows -- so a message is never marked answered without its answer in
        history, nor the other way round.
        Raises `TurnStateError` if the turn is unknown or already finished, and
        `ValueError` (writing nothing) if a message cannot be stored as JSON.
        """
        ids = list(inbox_ids)
        if ids and inbox_status not in INBOX_FINISHED:
            raise ValueError(f"inbox_status must be one of {INBOX_FINISHED}, got {inbox_status!r}")
        booking = None if usage is None else self._usage_insert(usage)
        if status not in TURN_FINISHED_STATUSES:
            raise ValueError(f"status must be one of {TURN_FINISHED_STATUSES}, got {status!r}")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts")
        stmt = (
            sa.update(turns)
            .where(turns.c.id == turn_id, turns.c.status == TURN_RUNNING)
            .values(status=status, finished_at=self._now())
        )

        def finish(conn: sa.Connection) -> None:
            if conn.execute(stmt).rowcount != 1:
                current = conn.scalar(sa.select(turns.c.status).where(turns.c.id == turn_id))
                raise TurnStateError(
                    f"turn {turn_id} does not exist"
                    if current is None
                    else f"turn {turn_id} is already finished ({current})"
                )
            if messages:
                conn.execute(
                    sa.insert(turn_messages),
                    [{"turn_id": turn_id, "seq": seq, "message": m} for seq, m in enumerate(messages, start=1)],
                )
            if booking is not None:
                conn.execute(booking)
            # Settled: the real usage (just booked) replaces what the turn held.
            conn.execute(sa.delete(budget_holds).where(budget_holds.c.turn_id == turn_id))
            if ids:
                values: dict[str, Any] = {"status": inbox_status, "finished_at": self._now()}
                if reply is not None:
                    values["reply"] = reply
                conn.execute(sa.update(inbox).where(inbox.c.id.in_(ids)).values(**values))

        await self._run("finish_turn", finish, write=True)

    async def history(
        self, session_id: int, *, limit_turns: int | None = None, before_turn: int | None = None
    ) -> list[Turn]:
        """The session's turns, oldest first, each with its messages (user message first).

        `limit_turns` keeps only the most recent N; `before_turn` leaves out that turn and
        later ones (e.g. the running turn the history is being loaded for).
        """
        if limit_turns is not None:
            _require_count("limit_turns", limit_turns)
        chosen = sa.select(turns).where(turns.c.session_id == session_id)
        if before_turn is not None:
            chosen = chosen.where(turns.c.id < before_turn)
        chosen = chosen.order_by(turns.c.id.desc())
        if limit_turns is not None:
            chosen = chosen.limit(limit_turns)
        t = chosen.subquery()
        query = (
            sa.select(t, turn_messages.c.message)
            .select_from(t.outerjoin(turn_messages, turn_messages.c.turn_id == t.c.id))
            .order_by(t.c.id, turn_messages.c.seq)
        )
        rows = await self._run("history", lambda conn: conn.execute(query).all(), write=False)
        result: list[Turn] = []
        for row in rows:
            if not result or result[-1].id != row.id:
                result.append(
                    Turn(
                        id=int(row.id),
                        status=row.status,
                        messages=[],
                        created_at=row.created_at,
                        user_key=row.user_key,
                        update_id=row.update_id,
                        finished_at=row.finished_at,
                    )
                )
            if row.message is not None:
                result[-1].messages.append(row.message)
        return result

    async def last_user_message(self, session_id: int) -> tuple[int, Message] | None:
        """The latest turn's id and user message in the session (for /retry), or None."""
        query = (
            sa.select(turns.c.id, turn_messages.c.message)
            .join(turn_messages, sa.and_(turn_messages.c.turn_id == turns.c.id, turn_messages.c.seq == 0))
            .where(turns.c.session_id == session_id)
            .order_by(turns.c.id.desc())
            .limit(1)
        )
        row = await self._run("last_user_message", lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else (int(row.id), row.message)

    async def running_turns(self) -> list[int]:
        """Turns still marked running: at startup these were cut off by a crash or restart."""
        query = sa.select(turns.c.id).where(turns.c.status == TURN_RUNNING).order_by(turns.c.id)
        ids = await self._run("running_turns", lambda conn: conn.scalars(query).all(), write=False)
        return [int(turn_id) for turn_id in ids]

    async def mark_stale_turns(self, status: str = "error", *, chat_key: str | None = None) -> int:
        """Give every running turn a final status (at startup, before any new turn); returns how many.

        `chat_key`: only the turns of that conversation's sessions (cluster mode: the
        replica taking a conversation over from a dead one; the other replicas' turns run on).
        """
        if status not in TURN_FINISHED_STATUSES:
            raise ValueError(f"status must be one of {TURN_FINISHED_STATUSES}, got {status!r}")
        which = turns.c.status == TURN_RUNNING
        if chat_key is not None:
            of_chat = sa.select(sessions.c.id).where(
                sa.or_(
                    sessions.c.session_key == chat_key,
                    sessions.c.session_key.startswith(f"{chat_key}#", autoescape=True),
                )
            )
            which = sa.and_(which, turns.c.session_id.in_(of_chat))
        stmt = sa.update(turns).where(which).values(status=status, finished_at=self._now())
        # Their budget holds go with them: a turn cut off by a crash uses nothing more.
        release = sa.delete(budget_holds).where(budget_holds.c.turn_id.in_(sa.select(turns.c.id).where(which)))

        def mark(conn: sa.Connection) -> int:
            conn.execute(release)
            return conn.execute(stmt).rowcount

        return await self._run("mark_stale_turns", mark, write=True)

    async def mark_turn_superseded(self, turn_id: int) -> bool:
        """/retry: mark a finished turn as replaced, so history users can leave it out.

        Returns False (changing nothing) when the turn is unknown, still running (its
        own `finish_turn` must still work) or already superseded.
        """
        stmt = (
            sa.update(turns)
            .where(turns.c.id == turn_id, turns.c.status.in_(TURN_FINISHED_STATUSES))
            .values(status=TURN_SUPERSEDED)
        )
        return await self._run("mark_turn_superseded", lambda conn: conn.execute(stmt).rowcount == 1, write=True)

    # ---------------------------------------------------------------- usage

    async def add_usage(
        self,
        *,
        user_key: str,
        chat_key: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        reasoning_tokens: int,
        cost: float | None,
        estimated_tokens: int = 0,
    ) -> None:
        """Record one model call's (or one turn's) token usage; `cost` None when no price is configured.

        `estimated_tokens`: how many of prompt + completion are estimates, not reported.
        """
        stmt = self._usage_insert(
            Usage(user_key, chat_key, model, prompt_tokens, completion_tokens, reasoning_tokens, cost, estimated_tokens)
        )
        await self._run("add_usage", lambda conn: conn.execute(stmt), write=True)

    def _usage_insert(self, u: Usage) -> sa.Insert:
        _require_text("user_key", u.user_key)
        _require_text("chat_key", u.chat_key)
        _require_text("model", u.model)
        _require_count("prompt_tokens", u.prompt_tokens)
        _require_count("completion_tokens", u.completion_tokens)
        _require_count("reasoning_tokens", u.reasoning_tokens)
        _require_count("estimated_tokens", u.estimated_tokens)
        if u.estimated_tokens > u.prompt_tokens + u.completion_tokens:
            raise ValueError("estimated_tokens cannot exceed prompt_tokens + completion_tokens")
        return sa.insert(usage).values(
            created_at=self._now(),
            user_key=u.user_key,
            chat_key=u.chat_key,
            model=u.model,
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cost=None if u.cost is None else float(u.cost),
            estimated_tokens=u.estimated_tokens,
        )

    async def usage(
        self, *, since: datetime, user_key: str | None = None, chat_key: str | None = None
    ) -> list[UsageRow]:
        """Usage recorded at or after `since`, one row per model (sorted by model name).

        `cost` sums the known costs and is None only when no record had one; `estimated`
        sums the tokens that were estimated rather than reported.
        """
        _require_aware("since", since)
        query = (
            sa.select(
                usage.c.model,
                sa.func.sum(usage.c.prompt_tokens),
                sa.func.sum(usage.c.completion_tokens),
                sa.func.sum(usage.c.reasoning_tokens),
                sa.func.sum(usage.c.cost),
                sa.func.count(),
                sa.func.sum(usage.c.estimated_tokens),
            )
            .where(usage.c.created_at >= since)
            .group_by(usage.c.model)
            .order_by(usage.c.model)
        )
        if user_key is not None:
            query = query.where(usage.c.user_key == user_key)
        if chat_key is not None:
            query = query.where(usage.c.chat_key == chat_key)
        rows = await self._run("usage", lambda conn: conn.execute(query).all(), write=False)
        return [
            UsageRow(
                model=model,
                prompt=int(prompt),
                completion=int(completion),
                reasoning=int(reasoning),
                cost=None if cost is None else float(cost),
                turns=int(count),
                estimated=int(estimated or 0),
            )
            for model, prompt, completion, reasoning, cost, count, estimated in rows
        ]

    async def tokens_used(self, user_key: str, since: datetime) -> int:
        """Prompt + completion tokens of a user since `since` (for daily budgets).

        Reasoning tokens are not added again: OpenAI-style usage already counts them
        inside completion tokens.
        """
        _require_aware("since", since)
        query = sa.select(sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0)).where(
            usage.c.user_key == user_key, usage.c.created_at >= since
        )
        return int(await self._run("tokens_used", lambda conn: conn.scalar(query), write=False))

    async def tokens_held(self, user_key: str) -> int:
        """Tokens reserved by the user's running turns (see `BudgetHold`): spoken for, not used yet."""
        held = self._held_query(user_key, self._now())
        return int(await self._run("tokens_held", lambda conn: conn.scalar(held), write=False))

    @staticmethod
    def _held_query(user_key: str, now: datetime) -> sa.Select[Any]:
        # Holds count only while their turn runs and before they expire: a turn ended by
        # any path, or a process gone for longer than the hold's ttl, frees the tokens.
        return (
            sa.select(sa.func.coalesce(sa.func.sum(budget_holds.c.tokens), 0))
            .select_from(budget_holds.join(turns, turns.c.id == budget_holds.c.turn_id))
            .where(
                budget_holds.c.user_key == user_key,
                budget_holds.c.expires_at > now,
                turns.c.status == TURN_RUNNING,
            )
        )

    def _admit(self, conn: sa.Connection, user_key: str, hold: BudgetHold) -> bool:
        """In `begin_turn`'s transaction: may the user start a turn? True: write `hold`.

        False when the user has no budget (nothing to hold against); raises
        `BudgetRefused` when used + held already reach the budget. Budget, usage and
        holds are read in one statement, so one snapshot sees a finishing turn either
        as its hold or as its usage, never as neither.
        """
        budget = sa.select(budgets.c.tokens_per_day).where(budgets.c.user_key == user_key).scalar_subquery()
        if conn.scalar(sa.select(budget)) is None:
            return False  # most users: no lock to wait for (a budget set meanwhile counts from the next turn)
        if self._dialect == "postgresql":
            # Concurrent admissions of one user, from any process, take turns here; READ
            # COMMITTED then shows each the holds of those admitted before it.
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"parley.budget:{user_key}"}
            )
        now = self._now()
        used = (
            sa.select(sa.func.coalesce(sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0))
            .where(usage.c.user_key == user_key, usage.c.created_at >= hold.since)
            .scalar_subquery()
        )
        row = conn.execute(sa.select(budget, used, self._held_query(user_key, now).scalar_subquery())).one()
        if row[0] is None:
            return False
        limit, spent, held = int(row[0]), int(row[1]), int(row[2])
        if spent + held >= limit:
            raise BudgetRefused(budget=limit, used=spent, held=held)
        # Housekeeping: this user's holds that no longer count.
        conn.execute(
            sa.delete(budget_holds).where(budget_holds.c.user_key == user_key, budget_holds.c.expires_at <= now)
        )
        return True

    # ---------------------------------------------------------------- access lists

    async def set_role(self, user_key: str, role: str, *, by: str | None = None) -> None:
        """Grant `role` ("admin" | "user" | "blocked"), replacing any previous one."""
        _require_text("user_key", user_key)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES} (owners come from the configuration), got {role!r}")
        stmt = self._insert(roles).values(user_key=user_key, role=role, granted_by=by, granted_at=self._now())
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_key"],
            set_={name: stmt.excluded[name] for name in ("role", "granted_by", "granted_at")},
        )
        await self._run("set_role", lambda conn: conn.execute(stmt), write=True)

    async def remember_tool_approval(self, chat_key: str, tool: str, *, by: str) -> None:
        """`tool` was approved in `chat_key` (`approval: ask_once_per_chat`): not asked there again."""
        _require_text("chat_key", chat_key)
        stmt = self._insert(tool_approvals).values(chat_key=chat_key, tool=tool, approved_by=by, approved_at=self._now())
        stmt = stmt.on_conflict_do_nothing(index_elements=["chat_key", "tool"])
        await self._run("remember_tool_approval", lambda conn: conn.execute(stmt), write=True)

    async def set_model_choice(self, chat_key: str, user_key: str, model: str | None) -> None:
        """The model `user_key` picked for themselves in `chat_key` (None: back to the chat's)."""
        _require_text("chat_key", chat_key)
        if model is None:
            stmt: Any = sa.delete(model_choices).where(
                model_choices.c.chat_key == chat_key, model_choices.c.user_key == user_key
            )
        else:
            stmt = self._insert(model_choices).values(
                chat_key=chat_key, user_key=user_key, model=model, chosen_at=self._now()
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["chat_key", "user_key"], set_={"model": stmt.excluded.model, "chosen_at": stmt.excluded.chosen_at}
            )
        await self._run("set_model_choice", lambda conn: conn.execute(stmt), write=True)

    async def model_choice(self, chat_key: str, user_key: str) -> str | None:
        """The model `user_key` picked for themselves in `chat_key`, or None."""
        query = sa.select(model_choices.c.model).where(
            model_choices.c.chat_key == chat_key, model_choices.c.user_key == user_key
        )
        return await self._run("model_choice", lambda conn: conn.scalar(query), write=False)

    async def tool_approved(self, chat_key: str, tool: str) -> str | None:
        """Who approved `tool` for good in `chat_key` (a user key), or None: ask."""
        query = sa.select(tool_approvals.c.approved_by).where(
            tool_approvals.c.chat_key == chat_key, tool_approvals.c.tool == tool
        )
        return await self._run("tool_approved", lambda conn: conn.scalar(query), write=False)

    async def clear_role(self, user_key: str) -> None:
        """Remove the user's stored role (a no-op when there is none)."""
        stmt = sa.delete(roles).where(roles.c.user_key == user_key)
        await self._run("clear_role", lambda conn: conn.execute(stmt), write=True)

    async def role(self, user_key: str) -> str | None:
        """The stored role, or None."""
        query = sa.select(roles.c.role).where(roles.c.user_key == user_key)
        return await self._run("role", lambda conn: conn.scalar(query), write=False)

    async def role_granted_by(self, user_key: str) -> str | None:
        """Who granted the user's stored role (a user key), or None (no role, or unknown)."""
        query = sa.select(roles.c.granted_by).where(roles.c.user_key == user_key)
        return await self._run("role_granted_by", lambda conn: conn.scalar(query), write=False)

    async def users_with_role(self, role: str) -> list[str]:
        """User keys holding `role`, sorted."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        query = sa.select(roles.c.user_key).where(roles.c.role == role).order_by(roles.c.user_key)
        return list(await self._run("users_with_role", lambda conn: conn.scalars(query).all(), write=False))

    async def set_budget(self, user_key: str, tokens_per_day: int | None, *, by: str | None = None) -> None:
        """Cap a user's tokens per day; None removes the cap. `by`: who set it (a user key)."""
        _require_text("user_key", user_key)
        if tokens_per_day is None:
            delete = sa.delete(budgets).where(budgets.c.user_key == user_key)
            await self._run("set_budget", lambda conn: conn.execute(delete), write=True)
            return
        _require_count("tokens_per_day", tokens_per_day)
        stmt = self._insert(budgets).values(
            user_key=user_key, tokens_per_day=tokens_per_day, updated_at=self._now(), set_by=by
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_key"],
            set_={name: stmt.excluded[name] for name in ("tokens_per_day", "updated_at", "set_by")},
        )
        await self._run("set_budget", lambda conn: conn.execute(stmt), write=True)

    async def budget(self, user_key: str) -> int | None:
        """The user's tokens-per-day cap, or None."""
        query = sa.select(budgets.c.tokens_per_day).where(budgets.c.user_key == user_key)
        value = await self._run("budget", lambda conn: conn.scalar(query), write=False)
        return None if value is None else int(value)

    async def budget_set_by(self, user_key: str) -> str | None:
        """Who set the user's budget (a user key), or None (no budget, or unknown)."""
        query = sa.select(budgets.c.set_by).where(budgets.c.user_key == user_key)
        return await self._run("budget_set_by", lambda conn: conn.scalar(query), write=False)

    # ---------------------------------------------------------------- known users

    async def remember_user(self, user_key: str, username: str | None, display_name: str | None) -> None:
        """Note who a user is (called on every inbound message), so "@alice" can be resolved.

        The upsert only rewrites the row when the username or display name changed.
        """
        platform, sep, rest = _require_text("user_key", user_key).partition(":")
        if not sep or not platform or not rest:
            raise ValueError(f"user_key must look like 'platform:id', got {user_key!r}")
        username = _strip_nul(username or "").strip().lstrip("@") or None
        display_name = _strip_nul(display_name) if display_name is not None else None
        stmt = self._insert(users).values(
            user_key=user_key,
            platform=platform,
            username=username,
            username_folded=username.casefold() if username else None,
            display_name=display_name,
            updated_at=self._now(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_key"],
            set_={name: stmt.excluded[name] for name in ("username", "username_folded", "display_name", "updated_at")},
            where=sa.or_(
                users.c.username.is_distinct_from(stmt.excluded.username),
                users.c.display_name.is_distinct_from(stmt.excluded.display_name),
            ),
        )
        await self._run("remember_user", lambda conn: conn.execute(stmt), write=True)

    async def known_user(self, user_key: str) -> tuple[str | None, str | None] | None:
        """(username, display name) of a user parley has seen, or None if it never has.

        Command answers name people this way ("@alice (telegram:61)") instead of by a bare id.
        """
        query = sa.select(users.c.username, users.c.display_name).where(users.c.user_key == user_key)
        row = await self._run("known_user", lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else (row[0], row[1])

    async def find_user(self, platform: str, username: str) -> str | None:
        """The user key behind "@alice" / "alice" on a platform (case-insensitive), or None.

        If two users have carried the name, the one seen with it most recently wins.
        """
        folded = username.strip().lstrip("@").casefold()
        if not folded:
            return None
        query = (
            sa.select(users.c.user_key)
            .where(users.c.platform == platform, users.c.username_folded == folded)
            .order_by(users.c.updated_at.desc())
            .limit(1)
        )
        return await self._run("find_user", lambda conn: conn.scalar(query), write=False)


def _inbox_row(row: Mapping[str, Any]) -> InboxRow:
    return InboxRow(
        id=int(row["id"]),
        platform=row["platform"],
        update_id=row["update_id"],
        chat_key=row["chat_key"],
        user_key=row["user_key"],
        inbound=row["inbound"],
        status=row["status"],
        attempts=int(row["attempts"]),
        turn_id=None if row["turn_id"] is None else int(row["turn_id"]),
        reply=row["reply"],
        received_at=row["received_at"],
        finished_at=row["finished_at"],
    )


def _chat_settings(row: Mapping[str, Any]) -> ChatSettings:
    return ChatSettings(
        model=row["model"],
        system_prompt=row["system_prompt"],
        busy_policy=row["busy_policy"],
        streaming=row["streaming"],
        allowed=bool(row["allowed"]),
        control=row["control"],
        set_by=dict(row["set_by"] or {}),
    )


def _validate_chat_fields(fields: Mapping[str, Any]) -> None:
    def optional(name: str, kind: type, choices: Iterable[Any] | None = None) -> None:
        if name not in fields or fields[name] is None:
            return
        value = fields[name]
        if not isinstance(value, kind) or (choices is not None and value not in choices):
            raise ValueError(f"chat setting {name}={value!r} is invalid")

    optional("model", str)
    optional("system_prompt", str)
    optional("busy_policy", str, BUSY_POLICIES)
    optional("streaming", bool)
    optional("control", str, CONTROL_POLICIES)
    if "allowed" in fields and not isinstance(fields["allowed"], bool):
        raise ValueError(f"chat setting allowed={fields['allowed']!r} must be True or False")
