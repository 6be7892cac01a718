"""The Pacer: one budget per chat inside one budget per platform, on a virtual clock."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

import pytest

from bots.clock import TimerHandle
from bots.outbox import ChatRef
from bots.pacing import Budget, Limiter, Pacer, Pacing, PacingPolicy, Priority
from tests.support.fakeclock import FakeClock


async def _grant_times(clock: FakeClock, limiter: Limiter, n: int, horizon: float) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        times.append(await limiter.take())

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await clock.advance(horizon)
    assert all(t.done() for t in tasks)
    return sorted(times)


async def test_burst_then_steady_rate() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=2), clock)
    times = await _grant_times(clock, limiter, 5, 10.0)
    start = 1000.0
    assert times == pytest.approx([start, start, start + 1, start + 2, start + 3])


async def test_never_exceeds_rate_in_any_window() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=2.0, burst=3), clock)
    times = await _grant_times(clock, limiter, 40, 30.0)
    # In any window of length w at most burst + rate*w grants.
    for i, t in enumerate(times):
        for w in (0.5, 1.0, 5.0):
            in_window = sum(1 for u in times[i:] if u < t + w)
            assert in_window <= 3 + 2.0 * w + 1e-9


async def test_priority_final_goes_before_interim() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=1), clock)
    assert limiter.try_take()
    order: list[str] = []

    async def take(name: str, prio: Priority) -> None:
        await limiter.take(prio)
        order.append(name)

    tasks = [
        asyncio.create_task(take("interim-1", Priority.INTERIM)),
        asyncio.create_task(take("interim-2", Priority.INTERIM)),
        asyncio.create_task(take("final", Priority.FINAL)),
    ]
    await clock.advance(3.0)
    await asyncio.gather(*tasks)
    assert order == ["final", "interim-1", "interim-2"]


async def test_pause_blocks_for_exactly_retry_after_then_one_goes() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=3), clock)
    limiter.pause(7.0)
    granted: list[float] = []

    async def take() -> None:
        granted.append(await limiter.take())

    tasks = [asyncio.create_task(take()) for _ in range(2)]
    await clock.advance(6.99)
    assert granted == []
    await clock.advance(0.01)
    assert granted == [pytest.approx(1007.0)]
    await clock.advance(1.0)
    assert granted == [pytest.approx(1007.0), pytest.approx(1008.0)]
    await asyncio.gather(*tasks)


async def test_cancelled_waiter_does_not_consume_a_token() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=1), clock)
    assert limiter.try_take()
    doomed = asyncio.create_task(limiter.take())
    survivor_times: list[float] = []

    async def survivor() -> None:
        survivor_times.append(await limiter.take())

    s = asyncio.create_task(survivor())
    await clock.settle()
    doomed.cancel()
    await clock.advance(1.0)
    assert survivor_times == [pytest.approx(1001.0)]
    await s


async def test_try_take_does_not_jump_the_queue() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=1), clock)
    assert limiter.try_take()
    waiter = asyncio.create_task(limiter.take())
    await clock.advance(1.0)
    assert waiter.done()
    # A token accrues only later; a waiter queued first has precedence over try_take.
    w2 = asyncio.create_task(limiter.take())
    await clock.settle()
    await clock.advance(0.5)
    assert not limiter.try_take()
    await clock.advance(0.5)
    assert w2.done()


async def test_pacing_shares_platform_budget_across_chats() -> None:
    clock = FakeClock()
    pacing = Pacing(
        PacingPolicy(private=Budget(10.0, 10), group=Budget(1.0, 1), platform=Budget(2.0, 2)), clock
    )
    chats = [ChatRef("telegram", str(i)) for i in range(4)]
    granted: list[float] = []

    async def go(chat: ChatRef) -> None:
        granted.append(await pacing.for_chat(chat).acquire())

    tasks = [asyncio.create_task(go(c)) for c in chats for _ in range(3)]
    await clock.advance(10.0)
    await asyncio.gather(*tasks)
    granted.sort()
    # 12 calls through a platform budget of 2/s, burst 2: the last goes at t0 + 5.
    assert granted[-1] == pytest.approx(1005.0)
    assert granted[:2] == [pytest.approx(1000.0)] * 2


async def test_group_budget_is_stricter_and_topics_share_it() -> None:
    clock = FakeClock()
    pacing = Pacing(PacingPolicy(private=Budget(1.0, 2), group=Budget(0.25, 1), platform=Budget(30, 30)), clock)
    topic_a = ChatRef("telegram", "-100", thread_id="1", is_private=False)
    topic_b = ChatRef("telegram", "-100", thread_id="2", is_private=False)
    assert pacing.for_chat(topic_a) is pacing.for_chat(topic_b)
    granted: list[float] = []

    async def go() -> None:
        granted.append(await pacing.for_chat(topic_a).acquire())

    tasks = [asyncio.create_task(go()) for _ in range(3)]
    await clock.advance(20.0)
    await asyncio.gather(*tasks)
    assert sorted(granted) == pytest.approx([1000.0, 1004.0, 1008.0])


async def test_global_pause_holds_every_chat() -> None:
    clock = FakeClock()
    pacing = Pacing(PacingPolicy(private=Budget(5, 5), group=Budget(1, 1), platform=Budget(50, 50)), clock)
    a, b = ChatRef("discord", "1"), ChatRef("discord", "2")
    pacing.for_chat(a).pause(3.0, scope="global")
    t = asyncio.create_task(pacing.for_chat(b).acquire())
    await clock.advance(2.9)
    assert not t.done()
    await clock.advance(0.1)
    assert t.result() == pytest.approx(1003.0)


def test_budget_validation() -> None:
    with pytest.raises(ValueError):
        Budget(0, 1)
    with pytest.raises(ValueError):
        Budget(1, 0)


# ---- lateness, release times and calls in flight (found by bench/pacing_stall.py) ----


class LateClock(FakeClock):
    """A FakeClock whose timers fire `lag` seconds late, like a busy event loop's."""

    def __init__(self, lag: float) -> None:
        super().__init__()
        self.lag = lag

    def call_at(self, when: float, callback: Any) -> TimerHandle:
        return super().call_at(when + self.lag, callback)


async def test_a_late_timer_shows_as_lateness_not_as_a_later_allowance() -> None:
    clock = LateClock(lag=0.3)
    limiter = Limiter(Budget(rate=1.0, burst=1), clock)
    assert limiter.try_take()
    waiter = asyncio.create_task(limiter.take())
    await clock.advance(2.0)
    # The token existed at 1001.0; the loop ran the dispatch only at 1001.3.
    assert waiter.result() == pytest.approx(1001.0)


async def test_tokens_a_late_timer_finds_were_allowed_one_interval_apart() -> None:
    clock = LateClock(lag=2.5)
    limiter = Limiter(Budget(rate=2.0, burst=5), clock)
    for _ in range(5):
        assert limiter.try_take()
    waiters = [asyncio.create_task(limiter.take()) for _ in range(3)]
    await clock.advance(4.0)
    assert [w.result() for w in waiters] == pytest.approx([1000.5, 1001.0, 1001.5])


async def test_a_call_the_platform_admits_at_once_was_allowed_when_the_chat_budget_was() -> None:
    clock = LateClock(lag=0.2)
    pacer = Pacing(PacingPolicy(Budget(1.0, 1), Budget(1.0, 1), Budget(100.0, 100)), clock).for_chat(
        ChatRef("telegram", "1")
    )
    assert isinstance(pacer, Pacer)
    await pacer.acquire()
    second = asyncio.create_task(pacer.acquire())
    await clock.advance(2.0)
    assert second.result() == pytest.approx(1001.0)


class BusyLoopClock(FakeClock):
    """Timers fire on time, but the tasks the n-th one wakes run `busy[n]` seconds later:
    an event loop busy with other work between a grant and the granted call leaving."""

    def __init__(self, busy: list[float]) -> None:
        super().__init__()
        self.busy = list(busy)

    async def advance(self, seconds: float) -> None:
        target = self._now + seconds
        await self.settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            callback()
            self._now += self.busy.pop(0) if self.busy else 0.0
            await self.settle()
        self._now = max(self._now, target)
        await self.settle()


async def test_calls_held_back_by_a_busy_loop_never_leave_bunched_past_the_budget() -> None:
    clock = BusyLoopClock(busy=[1.5])
    pacing = Pacing(PacingPolicy(Budget(10.0, 10), Budget(10.0, 10), Budget(rate=1.0, burst=2)), clock)
    left: list[float] = []
    allowed: list[float] = []

    async def call(chat: str) -> None:
        allowed.append(await pacing.for_chat(ChatRef("telegram", chat)).acquire())
        left.append(clock.now())

    tasks = [asyncio.create_task(call(str(i))) for i in range(5)]
    await clock.advance(10.0)
    await asyncio.gather(*tasks)
    # Two at once (the burst); the third was granted at 1001 but the loop let it go at
    # 1002.5, together with the fourth. The platform counts arrivals: bucket(1/s, 2)
    # means no three calls within one second, so the fifth must wait until 1003.5.
    assert left == pytest.approx([1000.0, 1000.0, 1002.5, 1002.5, 1003.5])
    assert all(c - a >= 1.0 - 1e-9 for a, c in zip(left, left[2:]))
    assert allowed[2] == pytest.approx(1001.0)  # reported as 1.5 s late, not as on time


async def test_only_in_flight_calls_per_platform_are_under_way_at_once() -> None:
    clock = FakeClock()
    policy = PacingPolicy(Budget(100.0, 100), Budget(100.0, 100), Budget(100.0, 100), in_flight=2)
    pacing = Pacing(policy, clock)
    answered = asyncio.Event()
    under_way: list[int] = [0]
    most = 0

    async def call(chat: str) -> None:
        nonlocal most
        async with pacing.for_chat(ChatRef("telegram", chat)).sending():
            under_way[0] += 1
            most = max(most, under_way[0])
            await answered.wait()
            under_way[0] -= 1

    tasks = [asyncio.create_task(call(str(i))) for i in range(5)]
    await clock.settle()
    assert under_way[0] == 2  # two calls wait for their answers; the other three wait for a place
    answered.set()
    await asyncio.gather(*tasks)
    assert most == 2 and under_way[0] == 0


async def test_background_calls_are_skipped_while_every_place_in_flight_is_taken() -> None:
    clock = FakeClock()
    policy = PacingPolicy(Budget(100.0, 100), Budget(100.0, 100), Budget(100.0, 100), in_flight=1)
    pacing = Pacing(policy, clock)
    typing, other = pacing.for_chat(ChatRef("telegram", "1")), pacing.for_chat(ChatRef("telegram", "2"))
    async with other.sending():  # an edit waits for its answer: the only place is taken
        async with typing.try_sending() as allowed:
            assert allowed is False  # skipped at once, not queued behind the edit
    async with typing.try_sending() as allowed:
        assert allowed is True
        # ... and while the typing call is under way it holds the place like any call.
        async with typing.try_sending() as again:
            assert again is False


def test_in_flight_must_allow_a_call() -> None:
    with pytest.raises(ValueError):
        PacingPolicy(Budget(1, 1), Budget(1, 1), Budget(1, 1), in_flight=0)




# ---- the final call's reserve ----------------------------------------------------------------


async def test_interim_calls_leave_the_reserve_and_a_final_call_takes_it_at_once() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=3), clock, reserve=1)
    granted: dict[str, float] = {}

    async def take(name: str, prio: Priority) -> None:
        granted[name] = await limiter.take(prio)

    interims = [asyncio.create_task(take(f"interim-{k}", Priority.INTERIM)) for k in range(3)]
    await clock.settle()
    # Two go at once (3 -> 1 token); the third would leave nothing for a final call.
    assert sorted(granted) == ["interim-0", "interim-1"]
    await clock.advance(0.5)
    final = asyncio.create_task(take("final", Priority.FINAL))
    await clock.settle()
    assert granted["final"] == pytest.approx(1000.5)  # no wait: the reserved token
    await clock.advance(10.0)
    # The queued interim waits until two tokens are back (0.5 at 1000.5 -> 2 at 1002).
    assert granted["interim-2"] == pytest.approx(1002.0)
    await asyncio.gather(final, *interims)


async def test_the_reserve_costs_interim_calls_a_burst_token_not_their_rate() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=1.0, burst=3), clock, reserve=1)
    times: list[float] = []

    async def one() -> None:
        times.append(await limiter.take(Priority.INTERIM))

    tasks = [asyncio.create_task(one()) for _ in range(6)]
    await clock.advance(10.0)
    await asyncio.gather(*tasks)
    assert sorted(times) == pytest.approx([1000.0, 1000.0, 1001.0, 1002.0, 1003.0, 1004.0])


async def test_a_waiting_interim_call_once_promoted_goes_at_once_on_the_reserve() -> None:
    clock = FakeClock()
    pacer = Pacing(PacingPolicy(Budget(1.0, 2), Budget(1.0, 2), Budget(100.0, 100)), clock).for_chat(
        ChatRef("telegram", "1")
    )
    await pacer.acquire(Priority.INTERIM)  # 2 -> 1 token: the reserve
    ending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(pacer.acquire(Priority.INTERIM, promote=ending))
    await clock.advance(0.3)
    assert not waiting.done()  # an interim call waits until it can leave the reserve (at 1001)
    ending.set_result(None)  # the stream ended: this slot is now the final edit's
    await clock.settle()
    assert waiting.done() and waiting.result() == pytest.approx(1000.3)
    # Promotion is not a token more: 0.3 were left, so the next call waits until 1001.
    later = asyncio.create_task(pacer.acquire())
    await clock.advance(0.6)
    assert not later.done()
    await clock.advance(0.2)
    assert later.result() == pytest.approx(1001.0)


async def test_a_promised_promotion_already_done_means_the_call_is_final() -> None:
    clock = FakeClock()
    pacer = Pacing(PacingPolicy(Budget(1.0, 2), Budget(1.0, 2), Budget(100.0, 100)), clock).for_chat(
        ChatRef("telegram", "1")
    )
    await pacer.acquire(Priority.INTERIM)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ended.set_result(None)
    async with pacer.sending(Priority.INTERIM, promote=ended) as allowed:
        assert allowed == pytest.approx(1000.0)


async def test_typing_leaves_the_reserve_too() -> None:
    clock = FakeClock()
    pacer = Pacing(PacingPolicy(Budget(1.0, 2), Budget(1.0, 2), Budget(100.0, 100)), clock).for_chat(
        ChatRef("telegram", "1")
    )
    async with pacer.try_sending() as allowed:
        assert allowed is True  # 2 -> 1
    async with pacer.try_sending() as allowed:
        assert allowed is False  # it would take the reserve
    assert await pacer.acquire() == pytest.approx(1000.0)  # a final call takes it at once


async def test_with_a_reserve_no_window_sees_more_than_the_budget() -> None:
    clock = FakeClock()
    limiter = Limiter(Budget(rate=2.0, burst=3), clock, reserve=1)
    times: list[float] = []

    async def one(prio: Priority, delay: float) -> None:
        await clock.sleep(delay)
        times.append(await limiter.take(prio))

    prios = [Priority.FINAL if k % 3 == 0 else Priority.INTERIM for k in range(40)]
    tasks = [asyncio.create_task(one(p, 0.13 * k)) for k, p in enumerate(prios)]
    await clock.advance(60.0)
    await asyncio.gather(*tasks)
    times.sort()
    for i, t in enumerate(times):
        for w in (0.5, 1.0, 5.0):
            assert sum(1 for u in times[i:] if u < t + w) <= 3 + 2.0 * w + 1e-9


def test_the_reserve_must_leave_a_token_to_take() -> None:
    with pytest.raises(ValueError):
        Limiter(Budget(1.0, 2), reserve=2)
    with pytest.raises(ValueError):
        Limiter(Budget(1.0, 2), reserve=-1)
    with pytest.raises(ValueError):
        PacingPolicy(Budget(1, 1), Budget(1, 1), Budget(1, 1), final_reserve=-1)


async def test_a_chat_with_a_burst_of_one_keeps_no_reserve() -> None:
    clock = FakeClock()
    pacer = Pacing(PacingPolicy(Budget(1.0, 1), Budget(1.0, 1), Budget(100.0, 100)), clock).for_chat(
        ChatRef("telegram", "1")
    )
    assert await pacer.acquire(Priority.INTERIM) == pytest.approx(1000.0)  # interims are not starved
