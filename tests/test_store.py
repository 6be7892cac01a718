"""The store suite: every case runs on SQLite and on PostgreSQL (see tests/store_fixtures.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bots import migrations
from bots.errors import ConfigError
from bots.store import (
    ChatSettings,
    NewMessage,
    Usage,
    Store,
    StoreError,
    TurnStateError,
    UsageRow,
    create_engine,
    metadata,
    redact_url,
    resolve_url,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
USER = {"role": "user", "content": "What is the weather in Paris?"}


class FakeWallClock:
    """The store's clock, moved by hand so time filters are tested exactly."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
async def clocked_store(store_url: str, clock: FakeWallClock) -> AsyncIterator[Store]:
    opened = await Store.open(store_url, utcnow=clock)
    try:
        yield opened
    finally:
        await opened.close()


def tool_turn(text: str = "It is sunny.") -> list[dict]:
    """What a turn with one tool call produces after the user message."""
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky":"clear"}'},
        {"role": "assistant", "content": text},
    ]


async def add_turn(store: Store, session_id: int, text: str, *, status: str = "ok") -> int:
    turn_id = await store.begin_turn(
        session_id, user_message={"role": "user", "content": text}, user_key="telegram:42", update_id=None
    )
    await store.finish_turn(turn_id, [{"role": "assistant", "content": f"re: {text}"}], status=status)
    return turn_id


# ----------------------------------------------------------------------------- URLs (no database)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///data/parley.db", "sqlite+aiosqlite:///data/parley.db"),
        ("sqlite:////abs/path.db", "sqlite+aiosqlite:////abs/path.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:pw@db.example/parley", "postgresql+asyncpg://u:pw@db.example/parley"),
        ("postgres://u@db.example:6543/parley", "postgresql+asyncpg://u@db.example:6543/parley"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql://u@h/d?schema=parley&sslmode=require", "postgresql+asyncpg://u@h/d?ssl=require"),
    ],
)
def test_user_urls_map_to_the_async_drivers(given: str, expected: str) -> None:
    assert resolve_url(given).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("mysql://u:pw@h/d", "unsupported database 'mysql'"),
        ("postgresql+psycopg2://u@h/d", "driver 'psycopg2'"),
        ("sqlite+pysqlite:///x.db", "driver 'pysqlite'"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("postgresql://u@h/d?schema=Robert'); DROP TABLE", "lowercase identifier"),
        ("not a url", "not a database URL"),
        ("postgresql://u@h/d?timeout=soon", "timeout= must be a number"),
    ],
)
def test_bad_urls_raise_config_error(given: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        resolve_url(given)


def test_config_errors_and_redaction_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_url("mysql://bob:hunter2@h/d")
    assert "hunter2" not in str(caught.value)
    assert redact_url("postgresql://bob:hunter2@h/d") == "postgresql://bob:***@h/d"


def test_a_sqlite_directory_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(StoreError, match="cannot create the directory"):
        create_engine(f"sqlite:///{tmp_path / 'taken' / 'parley.db'}")


async def test_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    # Port 1 on loopback refuses connections at once: no PostgreSQL needed for this case.
    with pytest.raises(StoreError) as caught:
        await Store.open("postgresql://bob:hunter2@127.0.0.1:1/parley")
    assert "hunter2" not in str(caught.value)


# ----------------------------------------------------------------------------- opening, migrations


async def test_sqlite_creates_its_directory_and_uses_wal(sqlite_url: str) -> None:
    path = Path(resolve_url(sqlite_url).database)
    assert not path.parent.exists()
    store = await Store.open(sqlite_url)
    try:
        await store.accept([msg("1")])
        # In WAL mode, writes go to the -wal file next to the database while it is open.
        assert path.exists() and Path(f"{path}-wal").exists()
    finally:
        await store.close()


async def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.begin_turn(999_999, user_message=USER, user_key="telegram:42", update_id=None)


async def test_open_migrates_to_head_and_reopening_is_a_no_op(store_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bots.store")
    first = await Store.open(store_url)
    try:
        assert await first.schema_revision() == migrations.head_revision()
        await first.set_role("telegram:42", "admin")
    finally:
        await first.close()
    assert [r for r in caplog.records if "migrated" in r.getMessage()]
    caplog.clear()
    second = await Store.open(store_url)
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]
    try:
        assert await second.schema_revision() == migrations.head_revision()
        assert await second.role("telegram:42") == "admin"
    finally:
        await second.close()


async def test_a_database_migrated_by_alembic_itself_opens_as_is(store_url: str) -> None:
    # The developer path: alembic's own command runs env.py, which builds parley's engine.
    # alembic's command API is synchronous and runs its own event loop, hence the thread.
    await asyncio.to_thread(command.upgrade, migrations.alembic_config(store_url), "0001")
    store = await Store.open(store_url)
    try:
        assert await store.schema_revision() == migrations.head_revision()
        assert await store.accept([msg("1")]) == [1]
    finally:
        await store.close()


async def test_a_database_from_a_newer_parley_is_refused(store_url: str) -> None:
    await (await Store.open(store_url)).close()
    engine = create_engine(store_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await engine.dispose()
    with pytest.raises(StoreError, match="cannot migrate .* from revision '9999'"):
        await Store.open(store_url)


async def test_concurrent_opens_of_an_empty_database_both_succeed(store_url: str) -> None:
    stores = await asyncio.gather(Store.open(store_url), Store.open(store_url))
    try:
        assert [await s.schema_revision() for s in stores] == [migrations.head_revision()] * 2
    finally:
        for s in stores:
            await s.close()


async def test_two_databases_migrate_concurrently_in_one_process(store_url: str, tmp_path: Path) -> None:
    # alembic's migration state is module-global: interleaved migrations would corrupt it.
    other_url = f"sqlite:///{tmp_path / 'other' / 'parley.db'}"
    stores = await asyncio.gather(Store.open(store_url), Store.open(other_url))
    try:
        assert [await s.schema_revision() for s in stores] == [migrations.head_revision()] * 2
    finally:
        for s in stores:
            await s.close()


async def test_migrated_schema_matches_the_table_definitions(store: Store, store_url: str) -> None:
    # The store's Table objects and migration 0001 are written separately; they must agree.
    engine = create_engine(store_url)
    try:
        async with engine.connect() as conn:
            diffs = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": True}), metadata)
            )
    finally:
        await engine.dispose()
    assert diffs == []


async def test_ping_and_close(store_url: str) -> None:
    store = await Store.open(store_url)
    assert await store.ping() is True
    await store.close()
    assert await store.ping() is False
    with pytest.raises(StoreError, match="closed"):
        await store.role("telegram:42")
    await store.close()  # closing twice is harmless (the app and a test fixture may both close it)


# ----------------------------------------------------------------------------- the inbox


def msg(update_id: str, *, platform: str = "telegram", chat: str = "telegram:5", text: str = "hi") -> NewMessage:
    return NewMessage(platform, update_id, chat, f"{platform}:42", {"text": text})


async def test_accept_stores_once_per_platform_and_update_id(store: Store) -> None:
    first = await store.accept([msg("1001"), msg("1001"), msg("1001", platform="discord"), msg("1002")])
    assert first[1] is None, "the same update twice in one batch is stored once"
    assert None not in (first[0], first[2], first[3])
    assert await store.accept([msg("1001")]) == [None]  # redelivered
    rows = await store.unfinished_messages()
    assert [(r.platform, r.update_id, r.status, r.attempts) for r in rows] == [
        ("telegram", "1001", "pending", 0), ("discord", "1001", "pending", 0), ("telegram", "1002", "pending", 0)
    ]
    assert [r.id for r in rows] == sorted(r.id for r in rows), "oldest first"
    assert await store.unfinished_messages(["discord"]) == [rows[1]]


async def test_concurrent_acceptances_of_one_update_yield_exactly_one_row(store: Store) -> None:
    results = await asyncio.gather(*(store.accept([msg("777")]) for _ in range(20)))
    assert sorted(r[0] is not None for r in results) == [False] * 19 + [True]


async def test_an_accepted_message_survives_a_restart(store_url: str) -> None:
    first = await Store.open(store_url)
    try:
        [inbox_id] = await first.accept([msg("5", text="nul\x00 stripped")])
    finally:
        await first.close()
    second = await Store.open(store_url)
    try:
        assert await second.accept([msg("5")]) == [None]
        [row] = await second.unfinished_messages()
        assert row.id == inbox_id and row.inbound == {"text": "nul stripped"} and row.chat_key == "telegram:5"
    finally:
        await second.close()


async def test_a_turn_carries_its_messages_from_pending_to_answered_atomically(store: Store) -> None:
    [a, b] = await store.accept([msg("1"), msg("2")])
    session = await store.current_session("telegram:5")
    turn = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id="1", inbox_ids=[a, b])
    await store.note_reply([a, b], {"pieces": [{"id": "9", "text": "It is", "markdown": False}]})
    [row_a, row_b] = await store.unfinished_messages()
    assert (row_a.status, row_a.attempts, row_a.turn_id) == ("running", 1, turn)
    assert row_b.reply == {"pieces": [{"id": "9", "text": "It is", "markdown": False}]}
    usage = Usage("telegram:42", "telegram:5", "m", 10, 5, 0, None)
    await store.finish_turn(
        turn, [{"role": "assistant", "content": "It is sunny."}], status="ok", usage=usage,
        inbox_ids=[a, b], inbox_status="answered", reply={"pieces": [{"id": "9", "text": "It is sunny.", "markdown": True}]},
    )
    assert await store.unfinished_messages() == []
    done = await store.inbox_message(a)
    assert done is not None and done.status == "answered" and done.finished_at is not None
    assert done.reply == {"pieces": [{"id": "9", "text": "It is sunny.", "markdown": True}]}
    assert await store.tokens_used("telegram:42", T0 - timedelta(days=3650)) == 15


async def test_a_failed_finish_changes_neither_the_turn_nor_its_messages(store: Store) -> None:
    [a] = await store.accept([msg("1")])
    session = await store.current_session("telegram:5")
    turn = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id="1", inbox_ids=[a])
    with pytest.raises(ValueError):
        await store.finish_turn(turn, [{"role": "assistant", "content": object()}], status="ok",
                                inbox_ids=[a], inbox_status="answered")
    [row] = await store.unfinished_messages()
    assert row.status == "running"
    assert await store.running_turns() == [turn]


async def test_a_second_attempt_supersedes_the_turn_a_crash_cut_off(store: Store) -> None:
    [a] = await store.accept([msg("1")])
    session = await store.current_session("telegram:5")
    cut = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id="1", inbox_ids=[a])
    assert await store.mark_stale_turns() == 1  # the restart
    again = await store.begin_turn(
        session, user_message=USER, user_key="telegram:42", update_id="1", inbox_ids=[a], supersede=[cut]
    )
    [row] = await store.unfinished_messages()
    assert (row.attempts, row.turn_id) == (2, again)
    assert [(t.id, t.status) for t in await store.history(session)] == [(cut, "superseded"), (again, "running")]


async def test_finish_messages_and_prune_keep_unfinished_ones(clocked_store: Store, clock: FakeWallClock) -> None:
    [old, old_waiting] = await clocked_store.accept([msg("old"), msg("old-2")])
    assert old is not None and old_waiting is not None
    await clocked_store.finish_messages([old], "expired")
    with pytest.raises(ValueError):
        await clocked_store.finish_messages([old], "running")
    clock.advance(timedelta(days=2))
    [new] = await clocked_store.accept([msg("new")])
    assert new is not None
    await clocked_store.finish_messages([new], "answered")
    assert await clocked_store.prune_inbox(timedelta(days=1)) == 1
    assert await clocked_store.inbox_message(old) is None
    assert await clocked_store.inbox_message(old_waiting) is not None
    assert await clocked_store.accept([msg("new")]) == [None]
    assert await clocked_store.accept([msg("old")]) != [None]  # forgotten, so new again
    assert await clocked_store.prune_inbox(timedelta(days=1)) == 0


# ----------------------------------------------------------------------------- chat settings


async def test_unknown_chat_has_default_settings(store: Store) -> None:
    assert await store.chat_settings("telegram:-100123") == ChatSettings()
    assert ChatSettings() == ChatSettings(None, None, None, None, False)


async def test_update_chat_settings_changes_only_the_given_fields(store: Store) -> None:
    key = "telegram:-100123:7"
    first = await store.update_chat_settings(key, model="gpt-5-mini", streaming=False)
    assert first == ChatSettings(model="gpt-5-mini", streaming=False)
    second = await store.update_chat_settings(key, busy_policy="interrupt", allowed=True, system_prompt="Be brief.")
    assert second == ChatSettings("gpt-5-mini", "Be brief.", "interrupt", False, True)
    assert await store.chat_settings(key) == second
    reset = await store.update_chat_settings(key, model=None)
    assert reset == ChatSettings(None, "Be brief.", "interrupt", False, True)
    assert await store.update_chat_settings(key) == reset  # nothing given: nothing changes
    assert await store.chat_settings("telegram:-100123") == ChatSettings()  # the parent chat is separate


@pytest.mark.parametrize(
    "fields",
    [{"colour": "red"}, {"busy_policy": "drop"}, {"streaming": "yes"}, {"allowed": None}, {"model": 5}],
)
async def test_update_chat_settings_rejects_bad_fields(store: Store, fields: dict) -> None:
    with pytest.raises(ValueError):
        await store.update_chat_settings("telegram:1", **fields)
    assert await store.chat_settings("telegram:1") == ChatSettings()


# ----------------------------------------------------------------------------- sessions and turns


async def test_current_session_is_created_lazily_and_stable(store: Store) -> None:
    first = await store.current_session("telegram:1")
    assert await store.current_session("telegram:1") == first
    assert await store.current_session("telegram:2") != first


async def test_concurrent_first_messages_share_one_session(store: Store) -> None:
    ids = await asyncio.gather(*(store.current_session("discord:55") for _ in range(10)))
    assert len(set(ids)) == 1


async def test_new_session_starts_fresh_and_keeps_the_old_one(store: Store) -> None:
    old = await store.current_session("telegram:1")
    await add_turn(store, old, "hello")
    new = await store.new_session("telegram:1")
    assert new != old
    assert await store.current_session("telegram:1") == new
    assert await store.history(new) == []
    assert [t.messages[0]["content"] for t in await store.history(old)] == ["hello"]


async def test_concurrent_new_sessions_all_succeed(store: Store) -> None:
    # /new racing /new and a first message on a brand-new key: numbering must never collide.
    results = await asyncio.gather(
        *(store.new_session("telegram:9") for _ in range(8)), *(store.current_session("telegram:9") for _ in range(4))
    )
    new_ids = results[:8]
    assert len(set(new_ids)) == 8
    assert await store.current_session("telegram:9") == max(results)


async def test_begin_turn_stores_the_user_message_before_the_model_answers(store: Store) -> None:
    session = await store.current_session("telegram:1")
    turn_id = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id="1001")
    [turn] = await store.history(session)
    assert (turn.id, turn.status, turn.messages) == (turn_id, "running", [USER])
    assert (turn.user_key, turn.update_id, turn.finished_at) == ("telegram:42", "1001", None)
    assert turn.created_at.tzinfo is not None and turn.created_at.utcoffset() == timedelta(0)
    assert await store.running_turns() == [turn_id]


async def test_finish_turn_appends_tool_calls_and_results_in_order(store: Store) -> None:
    session = await store.current_session("telegram:1")
    turn_id = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=None)
    await store.finish_turn(turn_id, tool_turn(), status="ok")
    [turn] = await store.history(session)
    assert turn.status == "ok"
    assert turn.messages == [USER, *tool_turn()]
    assert turn.finished_at is not None
    assert await store.running_turns() == []


async def test_finish_turn_is_atomic(store: Store) -> None:
    session = await store.current_session("telegram:1")
    turn_id = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=None)
    broken = [*tool_turn()[:2], {"role": "assistant", "content": object()}]  # the last cannot be JSON
    with pytest.raises(ValueError, match="JSON serializable"):
        await store.finish_turn(turn_id, broken, status="ok")
    [turn] = await store.history(session)
    assert (turn.status, turn.messages) == ("running", [USER])  # neither messages nor status
    await store.finish_turn(turn_id, tool_turn(), status="ok")  # and it can still finish properly
    [turn] = await store.history(session)
    assert (turn.status, turn.messages) == ("ok", [USER, *tool_turn()])


async def test_finish_turn_refuses_unknown_and_finished_turns(store: Store) -> None:
    session = await store.current_session("telegram:1")
    turn_id = await add_turn(store, session, "hi")
    with pytest.raises(TurnStateError, match="already finished"):
        await store.finish_turn(turn_id, [{"role": "assistant", "content": "again"}], status="ok")
    with pytest.raises(TurnStateError, match="does not exist"):
        await store.finish_turn(turn_id + 1000, [], status="ok")
    [turn] = await store.history(session)
    assert turn.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "re: hi"}]


async def test_turn_arguments_are_validated(store: Store) -> None:
    session = await store.current_session("telegram:1")
    assistant_message = {"role": "assistant", "content": "x"}
    with pytest.raises(ValueError):
        await store.begin_turn(session, user_message=assistant_message, user_key="telegram:42", update_id=None)
    turn_id = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=None)
    with pytest.raises(ValueError):
        await store.finish_turn(turn_id, [], status="done")
    with pytest.raises(ValueError):
        await store.mark_stale_turns(status="running")


async def test_history_is_oldest_first_and_limited_to_recent_turns(store: Store) -> None:
    session = await store.current_session("telegram:1")
    other = await store.current_session("telegram:2")
    ids = [await add_turn(store, session, f"q{i}") for i in range(5)]
    await add_turn(store, other, "elsewhere")
    assert [t.id for t in await store.history(session)] == ids
    assert [t.id for t in await store.history(session, limit_turns=2)] == ids[-2:]
    assert await store.history(session, limit_turns=0) == []
    assert [t.id for t in await store.history(session, before_turn=ids[3], limit_turns=2)] == ids[1:3]
    assert [t.messages[0]["content"] for t in await store.history(other)] == ["elsewhere"]


async def test_last_user_message_is_the_latest_turns_question(store: Store) -> None:
    session = await store.current_session("telegram:1")
    assert await store.last_user_message(session) is None
    await add_turn(store, session, "first")
    second = await add_turn(store, session, "second", status="error")
    assert await store.last_user_message(session) == (second, {"role": "user", "content": "second"})


async def test_retry_supersedes_only_finished_turns(store: Store) -> None:
    session = await store.current_session("telegram:1")
    done = await add_turn(store, session, "first")
    running = await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=None)
    assert await store.mark_turn_superseded(done) is True
    assert await store.mark_turn_superseded(done) is False  # already
    assert await store.mark_turn_superseded(running) is False  # still running: left alone
    assert await store.mark_turn_superseded(running + 1000) is False
    assert {t.id: t.status for t in await store.history(session)} == {done: "superseded", running: "running"}
    await store.finish_turn(running, [{"role": "assistant", "content": "fine"}], status="ok")


async def test_stale_running_turns_are_marked(store: Store) -> None:
    session = await store.current_session("telegram:1")
    done = await add_turn(store, session, "done")
    left = [
        await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=str(i)) for i in range(2)
    ]
    assert await store.running_turns() == left
    assert await store.mark_stale_turns() == 2
    assert await store.running_turns() == []
    assert {t.id: t.status for t in await store.history(session)} == {done: "ok", left[0]: "error", left[1]: "error"}
    assert await store.mark_stale_turns() == 0


async def test_history_survives_closing_and_reopening(store_url: str) -> None:
    first = await Store.open(store_url)
    try:
        session = await first.current_session("telegram:1")
        turn_id = await first.begin_turn(session, user_message=USER, user_key="telegram:42", update_id=None)
        await first.finish_turn(turn_id, tool_turn(), status="interrupted")
    finally:
        await first.close()
    second = await Store.open(store_url)
    try:
        assert await second.current_session("telegram:1") == session
        [turn] = await second.history(session)
        assert (turn.id, turn.status, turn.messages) == (turn_id, "interrupted", [USER, *tool_turn()])
    finally:
        await second.close()


_CRASHING_WRITER = textwrap.dedent(
    """
    import asyncio, os, sys
    from bots.store import Store

    async def main(url):
        store = await Store.open(url)
        session = await store.current_session("telegram:1")
        done = await store.begin_turn(session, user_message={"role": "user", "content": "one"},
                                      user_key="telegram:42", update_id="1")
        await store.finish_turn(done, [{"role": "assistant", "content": "two"}], status="ok")
        await store.begin_turn(session, user_message={"role": "user", "content": "three"},
                               user_key="telegram:42", update_id="2")
        sys.stdout.flush()
        os._exit(0)  # die mid-turn: no close(), no cleanup

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_history_survives_a_process_that_died_mid_turn(store_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_WRITER, store_url, cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    store = await Store.open(store_url)
    try:
        session = await store.current_session("telegram:1")
        turns = await store.history(session)
        assert [(t.status, [m["content"] for m in t.messages]) for t in turns] == [
            ("ok", ["one", "two"]),
            ("running", ["three"]),
        ]
        assert await store.running_turns() == [turns[1].id]
        assert await store.mark_stale_turns() == 1
        assert await store.last_user_message(session) == (turns[1].id, {"role": "user", "content": "three"})
        assert await store.accept([msg("2")]) != [None]  # the dying process never stored it
    finally:
        await store.close()


# ----------------------------------------------------------------------------- usage


async def test_usage_is_grouped_by_model_and_filtered(clocked_store: Store, clock: FakeWallClock) -> None:
    store = clocked_store

    async def spend(user: str, chat: str, model: str, prompt: int, completion: int, cost: float | None) -> None:
        await store.add_usage(
            user_key=user,
            chat_key=chat,
            model=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=completion // 2,
            cost=cost,
        )

    await spend("telegram:1", "telegram:-100", "gpt-a", 1000, 100, 0.5)  # yesterday: outside `since`
    clock.advance(timedelta(days=1))
    today = clock.now
    await spend("telegram:1", "telegram:-100", "gpt-a", 10, 4, 0.25)
    await spend("telegram:2", "telegram:-100", "gpt-a", 20, 6, None)
    await spend("telegram:1", "telegram:7", "gpt-a", 30, 8, 0.5)
    await spend("telegram:1", "telegram:-100", "claude-b", 40, 10, None)

    assert await store.usage(since=today) == [
        UsageRow("claude-b", 40, 10, 5, None, 1),
        UsageRow("gpt-a", 60, 18, 9, 0.75, 3),
    ]
    assert await store.usage(since=today, user_key="telegram:1") == [
        UsageRow("claude-b", 40, 10, 5, None, 1),
        UsageRow("gpt-a", 40, 12, 6, 0.75, 2),
    ]
    assert await store.usage(since=today, chat_key="telegram:-100", user_key="telegram:1") == [
        UsageRow("claude-b", 40, 10, 5, None, 1),
        UsageRow("gpt-a", 10, 4, 2, 0.25, 1),
    ]
    assert (await store.usage(since=today - timedelta(days=1), user_key="telegram:1"))[1] == UsageRow(
        "gpt-a", 1040, 112, 56, 1.25, 3
    )
    assert await store.usage(since=clock.now + timedelta(seconds=1)) == []
    assert await store.tokens_used("telegram:1", today) == 10 + 4 + 30 + 8 + 40 + 10
    assert await store.tokens_used("telegram:1", today - timedelta(days=1)) == 102 + 1100
    assert await store.tokens_used("telegram:3", today) == 0


async def test_usage_rows_say_how_many_tokens_were_estimated(store: Store) -> None:
    """A turn cut off before the provider reported usage is booked with an estimate (issue 13.4)."""
    since = datetime.now(UTC) - timedelta(minutes=1)
    common = {"user_key": "telegram:1", "chat_key": "telegram:1", "model": "m", "reasoning_tokens": 0, "cost": None}
    await store.add_usage(**common, prompt_tokens=100, completion_tokens=20)  # reported
    await store.add_usage(**common, prompt_tokens=30, completion_tokens=5, estimated_tokens=35)  # cut off
    assert await store.usage(since=since) == [UsageRow("m", 130, 25, 0, None, 2, estimated=35)]
    assert await store.tokens_used("telegram:1", since) == 155, "estimates count against budgets too"
    with pytest.raises(ValueError):
        await store.add_usage(**common, prompt_tokens=1, completion_tokens=1, estimated_tokens=3)


async def test_usage_booked_before_migration_0005_counts_as_reported(store_url: str) -> None:
    await asyncio.to_thread(command.upgrade, migrations.alembic_config(store_url), "0004")
    engine = create_engine(store_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO usage (created_at, user_key, chat_key, model, prompt_tokens, completion_tokens,"
                    " reasoning_tokens, cost) VALUES (:at, 'telegram:1', 'telegram:1', 'm', 7, 3, 0, NULL)"
                ),
                {"at": datetime.now(UTC)},
            )
    finally:
        await engine.dispose()
    store = await Store.open(store_url)
    try:
        rows = await store.usage(since=datetime.now(UTC) - timedelta(hours=1))
        assert rows == [UsageRow("m", 7, 3, 0, None, 1, estimated=0)]
    finally:
        await store.close()


async def test_usage_rejects_naive_times_and_negative_tokens(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.usage(since=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        await store.tokens_used("telegram:1", datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        await store.add_usage(
            user_key="telegram:1",
            chat_key="telegram:1",
            model="m",
            prompt_tokens=-1,
            completion_tokens=0,
            reasoning_tokens=0,
            cost=None,
        )


# ----------------------------------------------------------------------------- access lists


async def test_roles_are_set_replaced_listed_and_cleared(store: Store) -> None:
    assert await store.role("telegram:1") is None
    await store.set_role("telegram:1", "admin", by="telegram:99")
    await store.set_role("telegram:2", "admin")
    await store.set_role("telegram:3", "blocked")
    assert await store.role("telegram:1") == "admin"
    assert await store.users_with_role("admin") == ["telegram:1", "telegram:2"]
    await store.set_role("telegram:2", "user")
    assert await store.users_with_role("admin") == ["telegram:1"]
    assert await store.users_with_role("user") == ["telegram:2"]
    await store.clear_role("telegram:1")
    await store.clear_role("telegram:404")  # nothing stored: fine
    assert await store.role("telegram:1") is None
    assert await store.users_with_role("admin") == []
    assert await store.users_with_role("blocked") == ["telegram:3"]


async def test_owner_and_unknown_roles_are_refused(store: Store) -> None:
    for bad in ("owner", "superuser"):
        with pytest.raises(ValueError):
            await store.set_role("telegram:1", bad)
    assert await store.role("telegram:1") is None


async def test_budgets_are_set_changed_and_removed(store: Store) -> None:
    assert await store.budget("telegram:1") is None
    await store.set_budget("telegram:1", 50_000)
    await store.set_budget("telegram:1", 80_000)
    await store.set_budget("telegram:2", 5)
    assert (await store.budget("telegram:1"), await store.budget("telegram:2")) == (80_000, 5)
    await store.set_budget("telegram:1", None)
    assert await store.budget("telegram:1") is None
    with pytest.raises(ValueError):
        await store.set_budget("telegram:2", -1)


# ----------------------------------------------------------------------------- known users


async def test_find_user_is_case_insensitive_and_per_platform(store: Store) -> None:
    await store.remember_user("telegram:42", "Alice_W", "Alice W.")
    await store.remember_user("discord:42", "bob", "Bob")
    for query in ("@alice_w", "alice_w", "ALICE_W", " @Alice_W "):
        assert await store.find_user("telegram", query) == "telegram:42"
    assert await store.find_user("discord", "alice_w") is None
    assert await store.find_user("discord", "@BOB") == "discord:42"
    assert await store.find_user("telegram", "@") is None


async def test_nul_characters_in_free_text_are_dropped_on_both_backends(store: Store) -> None:
    await store.remember_user("telegram:5", "eve\x00", "Eve\x00 Evil")
    assert await store.find_user("telegram", "eve") == "telegram:5"
    settings = await store.update_chat_settings("telegram:5", system_prompt="Be\x00 kind.")
    assert settings.system_prompt == "Be kind."


async def test_remember_user_follows_renames(clocked_store: Store, clock: FakeWallClock) -> None:
    store = clocked_store
    await store.remember_user("telegram:1", "@alice", "Alice")
    await store.remember_user("telegram:1", "@alice", "Alice")  # the same again: harmless
    clock.advance(timedelta(minutes=1))
    await store.remember_user("telegram:1", "alice2", "Alice")  # renamed
    clock.advance(timedelta(minutes=1))
    await store.remember_user("telegram:2", "Alice", "Another Alice")  # took the old name
    await store.remember_user("telegram:3", None, "No Username")
    assert await store.find_user("telegram", "alice2") == "telegram:1"
    assert await store.find_user("telegram", "alice") == "telegram:2"
    with pytest.raises(ValueError):
        await store.remember_user("no-platform", "x", None)


# ---------------------------------------------------------------- cluster mode (bots.cluster)


async def test_one_conversations_unfinished_messages_and_those_since(store: Store) -> None:
    [a, b, c] = await store.accept([msg("1"), msg("2", chat="telegram:6"), msg("3")])
    assert [r.id for r in await store.unfinished_messages(chat_key="telegram:5")] == [a, c]
    assert [r.id for r in await store.unfinished_messages(chat_key="telegram:5", after=a)] == [c]
    assert [r.id for r in await store.unfinished_messages(chat_key="telegram:6")] == [b]
    await store.finish_messages([a], "answered")
    assert [r.id for r in await store.unfinished_messages(chat_key="telegram:5")] == [c]


async def test_unfinished_chats_and_the_backlog_by_age(clocked_store: Store, clock: FakeWallClock) -> None:
    store = clocked_store
    assert await store.inbox_backlog() == (0, None)
    [a] = await store.accept([msg("1", chat="telegram:7")])
    clock.advance(timedelta(seconds=10))
    [b, c] = await store.accept([msg("2", chat="telegram:5"), msg("3", chat="telegram:7")])
    # Oldest first; only conversations whose messages are at least that old.
    assert await store.unfinished_chats(older_than=timedelta(seconds=5)) == ["telegram:7"]
    assert await store.unfinished_chats() == ["telegram:7", "telegram:5"]
    assert await store.inbox_backlog() == (3, T0)
    session = await store.current_session("telegram:7")
    await store.begin_turn(session, user_message=USER, user_key="telegram:42", update_id="1", inbox_ids=[a])
    assert await store.inbox_backlog() == (2, T0 + timedelta(seconds=10)), "a running message waits no more"
    await store.finish_messages([b, c], "answered")
    assert await store.unfinished_chats() == ["telegram:7"]


async def test_stale_turns_of_one_conversation_only(store: Store) -> None:
    here = await store.current_session("telegram:5")
    per_user = await store.current_session("telegram:5#telegram:42")
    lookalike = await store.current_session("telegram:50")
    turns = [
        await store.begin_turn(s, user_message=USER, user_key="telegram:42", update_id=None)
        for s in (here, per_user, lookalike)
    ]
    assert await store.mark_stale_turns(chat_key="telegram:5") == 2
    assert await store.running_turns() == [turns[2]], "another conversation's turn runs on"


async def test_facts_the_replicas_share(store: Store) -> None:
    assert await store.cluster_value("telegram.webhook") is None
    await store.set_cluster_value("telegram.webhook", "abc")
    await store.set_cluster_value("telegram.webhook", "def")
    assert await store.cluster_value("telegram.webhook") == "def"
