"""Budgets under concurrency, end to end on Telegram (issue 12.3).

Real python-telegram-bot connector, real openai SDK, real config and store (SQLite and
PostgreSQL), against the fake Telegram and the fake provider. One user writes in five
groups at once with a budget of 30 tokens; each answer uses 25. Before budget holds,
all five turns saw the budget unspent: 5 model calls, 125 tokens. Now the first turn
holds its estimate until it settles, so the other four are refused before the model
is called, and the overspend is bounded by one turn's reservation.

No sleeps: the admitted call is held open by the fake provider until every other
message has been decided (refused, or -- before the fix -- sent to the model too).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from tests.fakes.llm import Reply
from tests.fakes.telegram import FakeChat
from tests.support.conversations import Stack, key, start

USER_ID = 61
USER = f"telegram:{USER_ID}"
HELD = "⏳ Your replies still running may use up your daily budget; send this again when they finish."
SPENT = "⏳ You've used your daily budget of 30 tokens. It resets at 00:00 UTC."
USAGE = {"prompt_tokens": 15, "completion_tokens": 10, "total_tokens": 25}


def today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def inbox_statuses(url: str, chats: list[FakeChat]) -> list[str]:
    """The final status of every message the user sent in these chats (read with its own engine)."""
    from bots.store import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT status FROM inbox WHERE chat_key IN :keys ORDER BY status").bindparams(
                    sa.bindparam("keys", expanding=True)
                ),
                {"keys": [key(c) for c in chats]},
            )
            return [r[0] for r in rows]
    finally:
        await engine.dispose()


async def budgeted_user_in_groups(s: Stack, groups: int, budget: int) -> list[FakeChat]:
    await s.store.set_role(USER, "user")
    await s.store.set_budget(USER, budget)
    return [s.tg.group(f"Team {i}") for i in range(groups)]


async def test_parallel_chats_of_one_user_run_one_model_call_within_a_budget_of_30(
    store_url, fast_telegram, fake_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm, store=store_url)
    user = s.user(USER_ID, "Uma")
    chats = await budgeted_user_in_groups(s, 5, 30)
    gate = asyncio.Event()
    fake_llm.script(*(Reply.text("Answer.", usage=USAGE, hold=gate, hold_at=1) for _ in chats))

    for i, chat in enumerate(chats):
        s.say(chat, user, f"@parley_bot question {i}")

    def refused() -> list[FakeChat]:
        return [c for c in chats if HELD in s.bot_texts(c)]

    # Every message decided: a model call (held open by the gate) or a refusal.
    await fast_telegram.wait_for(lambda: len(fake_llm.requests) + len(refused()) == len(chats), timeout=15)
    calls_while_held = len(fake_llm.requests)
    gate.set()
    await s.settle_all()

    assert calls_while_held == 1, f"{calls_while_held} model calls for a budget of 30 (one turn's hold allowed)"
    assert len(fake_llm.requests) == 1
    assert await s.store.tokens_used(USER, today()) == 25
    assert await s.store.tokens_held(USER) == 0, "the hold was settled by the real usage"
    [answered] = [c for c in chats if c not in refused()]
    assert s.bot_texts(answered) == ["Answer."]
    assert all(s.bot_texts(c) == [HELD] for c in refused())
    assert await inbox_statuses(store_url, chats) == ["answered"] + ["failed"] * 4, "nothing left pending"

    # 25 of 30 used and nothing held: one more turn may start (and overspend by at most its hold)...
    fake_llm.reset()  # the replies scripted for the four refused turns were never asked for
    fake_llm.script(Reply.text("Second.", usage=USAGE))
    assert await s.turn(chats[0], user, "@parley_bot again") == "Second."
    assert await s.store.tokens_used(USER, today()) == 50
    # ...after which the day's budget is spent: the old line, and no model call.
    assert await s.ask(chats[1], user, "@parley_bot and again") == SPENT
    await s.barrier()
    assert len(fake_llm.requests) == 1
    assert (await s.store.unfinished_messages()) == []


@pytest.mark.parametrize(
    "allowance",
    [{"provider": {"extra_params": {"max_tokens": 100}}}, {"chat": {"reserve_completion_tokens": 100}}],
    ids=["extra_params.max_tokens", "chat.reserve_completion_tokens"],
)
async def test_parallel_chats_run_together_while_their_holds_fit(
    sqlite_url, fast_telegram, fake_llm, parley, allowance
) -> None:
    # With 1024 tokens reserved per answer (the default) only one of these would start;
    # capped at 100, three holds of about 100 + the prompt fit in 1,000 together.
    s = await start(parley, fast_telegram, fake_llm, store=sqlite_url, **allowance)
    user = s.user(USER_ID, "Uma")
    chats = await budgeted_user_in_groups(s, 3, 1000)
    gate = asyncio.Event()
    fake_llm.script(*(Reply.text("Together.", usage=USAGE, hold=gate, hold_at=1) for _ in chats))
    for i, chat in enumerate(chats):
        s.say(chat, user, f"@parley_bot question {i}")
    await fake_llm.wait_for(lambda: len(fake_llm.requests) == 3, timeout=15)
    held = await s.store.tokens_held(USER)
    assert 300 < held < 1000, held
    gate.set()
    await s.settle_all()
    assert all(s.bot_texts(c) == ["Together."] for c in chats)
    assert await s.store.tokens_used(USER, today()) == 75
    assert await s.store.tokens_held(USER) == 0
