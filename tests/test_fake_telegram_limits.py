"""The fake Telegram's flood model: 429s appear above the configured rate, never below it.

Time is injected (a plain settable clock for the limiter, ``FakeClock`` for the server),
so every assertion is exact and nothing sleeps. The last tests go through the real PTB to
show the 429 envelope reaches a bot as ``RetryAfter``.
"""

from __future__ import annotations

from typing import Any

import pytest
import telegram
from telegram.error import RetryAfter

from tests.fakes.telegram import FakeTelegram, FloodControl, TelegramLimits
from tests.support.fakeclock import FakeClock

# PTB 22 warns on every RetryAfter it builds (its int -> timedelta migration); not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Deprecated since version v22.2")


class _Clock:
    """Time as a number the test moves by hand (the limiter only reads it)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _limiter(clock: _Clock, **overrides: Any) -> FloodControl:
    return FloodControl(TelegramLimits(**overrides), clock)


def _accepted_over(clock: _Clock, limiter: FloodControl, interval: float, calls: int, **kw: Any) -> list[bool]:
    """Make ``calls`` calls, ``interval`` seconds apart."""
    results = []
    for _ in range(calls):
        results.append(limiter.acquire(1, **kw) is None)
        clock.t += interval
    return results


@pytest.mark.parametrize("interval", [1.0, 1.25, 2.0, 10.0])
def test_per_chat_calls_at_or_below_the_rate_are_never_refused(interval: float) -> None:
    clock = _Clock()
    limiter = _limiter(clock, per_chat_rate=1.0, per_chat_burst=3)
    assert all(_accepted_over(clock, limiter, interval, 200, is_group=False))


@pytest.mark.parametrize("interval", [0.9, 0.5, 0.25, 0.01])
def test_per_chat_calls_above_the_rate_get_429s(interval: float) -> None:
    clock = _Clock()
    limiter = _limiter(clock, per_chat_rate=1.0, per_chat_burst=3, global_rate=1000.0, global_burst=1000)
    calls = round(200.0 / interval)
    results = _accepted_over(clock, limiter, interval, calls, is_group=False)
    assert results[:3] == [True, True, True]  # the burst
    assert not all(results)
    # the throughput is exactly the burst plus the rate times the time of the last call
    last_call_at = (calls - 1) * interval
    assert abs(sum(results) - (3 + last_call_at * 1.0)) <= 1


def test_retry_after_is_the_rounded_up_wait_and_refused_calls_consume_nothing() -> None:
    clock = _Clock()
    limiter = _limiter(clock, per_chat_rate=0.25, per_chat_burst=1)
    assert limiter.acquire(1, is_group=False) is None
    clock.t += 1.0
    assert limiter.acquire(1, is_group=False) == 3  # 3 s until the next token
    for _ in range(10):
        assert limiter.acquire(1, is_group=False) == 3  # hammering does not push it back
    clock.t += 3.0
    assert limiter.acquire(1, is_group=False) is None


def test_group_window_allows_20_per_minute() -> None:
    clock = _Clock()
    limiter = _limiter(clock, per_chat_rate=100.0, per_chat_burst=100, group_per_minute=20, group_window=60.0)
    for _ in range(20):
        assert limiter.acquire(-5, is_group=True) is None
        clock.t += 1.0
    assert limiter.acquire(-5, is_group=True) == 40  # the first call leaves the window at t=60
    assert limiter.acquire(6, is_group=False) is None  # private chats have no group window
    clock.t += 40.0
    assert limiter.acquire(-5, is_group=True) is None
    assert limiter.acquire(-5, is_group=True) == 1


def test_at_most_20_in_any_60_seconds_when_a_group_sends_at_1_per_second() -> None:
    clock = _Clock()
    limiter = _limiter(clock)
    stamps = []
    for _ in range(600):
        if limiter.acquire(-5, is_group=True) is None:
            stamps.append(clock())
        clock.t += 1.0
    assert max(sum(1 for s in stamps if start <= s < start + 60) for start in stamps) == 20
    assert len(stamps) == 200  # 20 per minute over 10 minutes


def test_global_bucket_spans_all_chats() -> None:
    clock = _Clock()
    limiter = _limiter(clock, global_rate=30.0, global_burst=30)
    assert all(limiter.acquire(chat, is_group=False) is None for chat in range(1, 31))
    assert limiter.acquire(31, is_group=False) == 1
    clock.t += 1 / 30
    assert limiter.acquire(31, is_group=False) is None


def test_draft_and_chat_action_knobs() -> None:
    clock = _Clock()
    counted = _limiter(clock, per_chat_burst=1, global_burst=2, global_rate=1.0)
    assert counted.acquire(1, is_group=False, kind="draft") is None
    assert counted.acquire(1, is_group=False, kind="message") == 1  # drafts share the chat budget
    assert counted.acquire(2, is_group=False, kind="chat_action") is None  # global only by default
    assert counted.acquire(2, is_group=False, kind="chat_action") == 1  # ...and the global bucket is empty
    free = _limiter(clock, per_chat_burst=1, count_drafts=False)
    for _ in range(5):
        assert free.acquire(1, is_group=False, kind="draft") is None
    assert free.acquire(1, is_group=False) is None
    strict = _limiter(clock, per_chat_burst=1, count_chat_actions=True)
    assert strict.acquire(1, is_group=False, kind="chat_action") is None
    assert strict.acquire(1, is_group=False) == 1


def test_disabled_limits_never_refuse() -> None:
    clock = _Clock()
    limiter = _limiter(clock, enabled=False)
    assert all(limiter.acquire(1, is_group=True) is None for _ in range(1000))


# --------------------------------------------------------------------------- through PTB


async def test_sends_edits_and_deletes_share_the_chat_budget_through_ptb(make_fake_telegram: Any) -> None:
    clock = FakeClock()
    fake: FakeTelegram = await make_fake_telegram(clock=clock.now, limits=TelegramLimits(per_chat_burst=3))
    chat = fake.private_chat(fake.user(77, "Ann"))
    bot = telegram.Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)
    async with bot:
        sent = await bot.send_message(chat.id, "a")
        await bot.edit_message_text("ab", chat.id, sent.message_id)
        await bot.delete_message(chat.id, sent.message_id)
        with pytest.raises(RetryAfter, match="Retry in 1 seconds"):
            await bot.send_message(chat.id, "refused")
        await clock.advance(1.0)
        await bot.send_message(chat.id, "accepted after retry_after")
        # a steady 1/s edit stream never sees a 429
        live = fake.bot_texts(chat.id)
        assert live == ["accepted after retry_after"]
        message_id = fake.messages(chat.id)[-1].message_id
        for i in range(30):
            await clock.advance(1.0)
            await bot.edit_message_text(f"edit {i}", chat.id, message_id)
    assert fake.count_429() == 1
    assert fake.count_429("sendMessage", chat.id) == 1
    refused = fake.calls_to("sendMessage")[1]
    assert (refused.status, refused.retry_after) == (429, 1)
    assert fake.bot_texts(chat.id) == ["edit 29"]


async def test_real_time_spam_is_throttled_to_the_burst(fake_telegram: FakeTelegram) -> None:
    """With the real clock: 20 back-to-back sends to one chat; only about the burst passes.

    Bounds are generous (a slow machine may refill a token or two mid-loop) and cannot flake
    the other way: at most burst + elapsed seconds * rate sends can pass.
    """
    fake = fake_telegram
    chat = fake.private_chat(fake.user(77, "Ann"))
    bot = telegram.Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)
    async with bot:
        accepted = 0
        for i in range(20):
            try:
                await bot.send_message(chat.id, f"spam {i}")
                accepted += 1
            except RetryAfter:
                pass
    elapsed = fake.calls[-1].t_responded - fake.calls[0].t_received  # type: ignore[operator]
    assert 3 <= accepted <= 3 + int(elapsed * 1.0) + 1
    assert fake.count_429(chat_id=chat.id) == 20 - accepted
