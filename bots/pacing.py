"""One outbound budget per chat, nested in one budget per bot.

Every call parley makes to a chat -- send, edit, delete, typing, draft -- first takes a
token here. Independent throttles per feature add up past the platform's limit (that is
how other gateways earned multi-hour flood bans), so there is exactly one budget per chat,
sized from the platform's documented limits, plus the platform-wide budget all chats share.

Waiters are served by priority, then first come first served: a final edit or a new
message (`Priority.FINAL`) goes before interim edits (`Priority.INTERIM`), so under
pressure the newest-text edits are the ones that wait -- and because the caller reads
the newest text only *after* its slot is granted, everything that arrived meanwhile
collapses into one edit. A 429 pauses the chat (or the bot) for exactly `retry_after`.

Each chat's budget also keeps a reserve (`PacingPolicy.final_reserve`, one token): interim
edits and background calls may only take a token that leaves it, so when a stream ends
the final edit finds a token at once instead of waiting up to a whole interval behind the
interims that spent the budget. A waiting interim call can be promoted (`promote=`): the
reply's flusher is usually waiting for its next interim slot when the stream ends, and
from then on that slot is the final edit's.

The platform counts calls when they arrive, not when parley granted them. A busy event
loop can hold granted calls back and then release several together, so a granted call
also checks the same budget against the moments earlier calls actually left (GCRA)
before it goes: late calls never bunch up past the burst. And since a stalled loop can
also hold back calls that already left the Pacer, only `PacingPolicy.in_flight` calls
per platform may be under way at once (`Pacer.sending`). `acquire` returns the moment
the budget allowed the call, so `now - acquire()` is the event loop's delay (lateness).

In cluster mode (several replicas) the bot's and the chats' budgets must hold for all
replicas together, so a `Pacing` can be given shared budgets (`SharedChatBudget`, from
`bots.cluster.budgets`): after its local grant a call also takes a token there, and a 429
freezes the chat (or the bot) on every replica. Everything above still happens locally
first; without shared budgets nothing changes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

from bots.clock import REAL_CLOCK, Clock, TimerHandle
from bots.outbox import ChatRef

if TYPE_CHECKING:
    from bots.cluster.budgets import SharedBudgets

_EPS = 1e-9


class Priority(IntEnum):
    """Lower goes first."""

    FINAL = 0  # final edits, new messages, command replies: never dropped
    INTERIM = 1  # interim edits of a live message: coalesced by the caller
    BACKGROUND = 2  # typing, draft refreshes: skipped when the budget is tight


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket: `rate` operations per second sustained, up to `burst` at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")


class Limiter:
    """A token bucket whose waiters are served in (priority, arrival) order.

    One timer per bucket, armed for the moment the next token exists; waiting costs a
    future, not a polling task, so thousands of chats can wait at once.

    `reserve` tokens are kept for `Priority.FINAL` calls: an interim or background call
    is granted only if `reserve` tokens remain after it. The bucket's sustained rate is
    unchanged -- interims simply run with that many tokens in hand -- so the call that
    ends a reply (or starts the next one) never queues behind them.
    """

    def __init__(self, budget: Budget, clock: Clock = REAL_CLOCK, *, reserve: int = 0) -> None:
        if not 0 <= reserve < budget.burst:
            raise ValueError("reserve must be at least 0 and less than the burst")
        self._rate = budget.rate
        self._capacity = float(budget.burst)
        self._reserve = float(reserve)
        self._clock = clock
        self._tokens = self._capacity
        self._stamp = float("-inf")  # a new bucket is full
        self._paused_until = float("-inf")
        self._waiters: list[tuple[int, int, asyncio.Future[float], float]] = []  # prio, seq, fut, since
        self._seq = itertools.count()
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer is due: the moment the next token exists
        self._tat = float("-inf")  # GCRA state of the calls actually released (see release_wait)

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, fut, _ in self._waiters if not fut.done())

    def idle(self) -> bool:
        """True when forgetting this bucket loses nothing (full, not paused, nobody waiting)."""
        now = self._clock.now()
        self._refill(now)
        return not self._waiters and now >= self._paused_until and self._tokens >= self._capacity - _EPS

    def try_take(self, priority: Priority = Priority.FINAL) -> bool:
        """Take a token only if one is free right now for `priority` (an interim or
        background call leaves the reserve) and no waiter of the same or a higher
        priority is queued ahead."""
        now = self._clock.now()
        if now < self._paused_until:
            return False
        head = self._head()
        if head is not None and head[0] <= priority:
            return False
        self._refill(now)
        if self._tokens >= self._need(priority) - _EPS:
            self._tokens -= 1
            return True
        return False

    async def take(self, priority: Priority = Priority.FINAL, *, promote: asyncio.Future[Any] | None = None) -> float:
        """Wait for a token; returns the time at which the budget allowed the call.

        That is the moment a token existed for this waiter -- not the moment the timer
        callback happened to run -- so `now - take()` shows how late the event loop let
        the call go out (LiveReply reports it as edit lateness).

        Once `promote` is done, a call waiting as interim or background waits as
        `Priority.FINAL`: it moves ahead of other interims and may take the reserve.
        """
        if promote is not None and promote.done():
            priority = Priority.FINAL
        now = self._clock.now()
        if self.try_take(priority):
            return now
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), fut, now))
        self._arm()
        if promote is None or priority == Priority.FINAL:
            return await fut

        def promoted(_: asyncio.Future[Any]) -> None:
            self._promote(fut)

        promote.add_done_callback(promoted)
        try:
            return await fut
        finally:
            promote.remove_done_callback(promoted)

    def _promote(self, fut: asyncio.Future[float]) -> None:
        """The waiter `fut` now waits as `Priority.FINAL` (keeping its place among finals)."""
        for i, (prio, seq, waiter, since) in enumerate(self._waiters):
            if waiter is fut:
                if prio != Priority.FINAL and not fut.done():
                    self._waiters[i] = (int(Priority.FINAL), seq, waiter, since)
                    heapq.heapify(self._waiters)
                    self._arm()
                return

    def _need(self, priority: int) -> float:
        """Tokens the bucket must hold for a call of `priority` to go: one, plus the reserve
        unless the call is final."""
        return 1.0 if priority == Priority.FINAL else 1.0 + self._reserve

    def _head(self) -> tuple[int, int, asyncio.Future[float], float] | None:
        """The first waiter still waiting (cancelled ones are dropped on the way)."""
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        return self._waiters[0] if self._waiters else None

    def release_wait(self, now: float) -> float:
        """Seconds until a granted call may actually leave, judged by when earlier calls left.

        Tokens are granted on schedule, but a busy event loop can hold granted calls back
        and then let several go at once -- and the platform counts calls when they
        arrive. This checks the same budget (as GCRA) against the moments calls were
        released, so calls that went out late can never bunch up past the burst.
        """
        return max(0.0, self._tat - (self._capacity - 1) / self._rate - now)

    def released(self, now: float) -> None:
        """A granted call leaves now."""
        self._tat = max(self._tat, now) + 1 / self._rate

    def pause(self, seconds: float) -> None:
        """Nothing leaves for `seconds`; then exactly one call may go at once."""
        now = self._clock.now()
        until = now + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._tokens = 1.0
            self._stamp = until
        self._arm()

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def _ready_at(self, now: float, need: float) -> float:
        self._refill(now)
        when = max(now, self._paused_until)
        if self._tokens < need - _EPS:
            when = max(when, self._stamp + (need - self._tokens) / self._rate)
        return when

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        head = self._head()
        if head is not None:
            now = self._clock.now()
            self._timer_at = self._ready_at(now, self._need(head[0]))
            if self._timer_at <= now:  # ready already (a waiter was promoted): no timer to wait for
                self._dispatch()
                return
            self._timer = self._clock.call_at(self._timer_at, self._dispatch)

    def _dispatch(self) -> None:
        self._timer = None
        now = self._clock.now()
        self._refill(now)
        granted = 0
        while now >= self._paused_until - _EPS:
            head = self._head()
            if head is None or self._tokens < self._need(head[0]) - _EPS:
                break
            _, _, fut, since = heapq.heappop(self._waiters)
            self._tokens -= 1
            # The first token existed when the timer was due, each further one 1/rate
            # later (a late timer finds several); a waiter that came later still was
            # allowed on arrival. Never in the future.
            fut.set_result(min(now, max(since, self._timer_at + granted / self._rate)))
            granted += 1
        self._arm()


class SharedChatBudget(Protocol):
    """A chat's part of the budgets all replicas share (`bots.cluster.budgets.ChatBudget`)."""

    async def admit(self, priority: Priority = Priority.FINAL) -> float:
        """Wait for a shared token of the bot and of the chat; the seconds waited."""
        ...

    async def try_admit(self) -> bool:
        """Take both shared tokens only if free now; never waits."""
        ...

    def freeze(self, seconds: float, *, scope: str = "chat") -> None:
        """A 429: nothing goes to the chat (`scope="global"`: to the bot) on any replica for `seconds`."""
        ...


class Pacer:
    """The budget of one chat, drawing from the platform-wide budget too (and, in cluster
    mode, from the budgets shared by every replica: `shared`)."""

    def __init__(
        self,
        chat: Limiter,
        platform: Limiter,
        in_flight: asyncio.Semaphore | None = None,
        shared: SharedChatBudget | None = None,
    ) -> None:
        self._chat = chat
        self._platform = platform
        self._in_flight = in_flight
        self._shared = shared

    async def acquire(
        self, priority: Priority = Priority.FINAL, *, promote: asyncio.Future[Any] | None = None
    ) -> float:
        """Wait until both budgets allow one call; returns when they allowed it.

        If the platform budget has a token free once the chat's is granted, the call was
        allowed when the chat's budget allowed it: any time spent getting here since is
        the event loop's delay, and is reported as such. Once `promote` is done, the call
        waits as `Priority.FINAL` (see `Limiter.take`).
        """
        return await self._release(await self._grant(priority, promote))

    @asynccontextmanager
    async def sending(
        self, priority: Priority = Priority.FINAL, *, promote: asyncio.Future[Any] | None = None
    ) -> AsyncIterator[float]:
        """`acquire`, holding one of the platform's places for calls in flight until the
        block ends: make exactly one platform call inside it. Yields when the call was allowed.

        Only `in_flight` calls per platform may be between leaving and being answered.
        Those are the calls a stalled event loop can hold back and then let arrive
        together with later ones; bounding them keeps such a bunch within the platform's
        burst (see `PacingPolicy.in_flight`).
        """
        allowed = await self._grant(priority, promote)
        if self._in_flight is None:
            yield await self._release(allowed)
            return
        async with self._in_flight:
            yield await self._release(allowed)

    async def _grant(self, priority: Priority, promote: asyncio.Future[Any] | None) -> float:
        allowed = await self._chat.take(priority, promote=promote)
        if promote is not None and promote.done():
            priority = Priority.FINAL
        if not self._platform.try_take(priority):
            allowed = await self._platform.take(priority, promote=promote)
        if self._shared is not None:
            # The local grant came first, so priorities and coalescing hold as in one process;
            # then the budgets every replica shares. A wait there is when the call was allowed.
            if promote is not None and promote.done():
                priority = Priority.FINAL
            if await self._shared.admit(priority) > 0:
                allowed = max(allowed, self._chat.clock.now())
        return allowed

    async def _release(self, allowed: float) -> float:
        """Hold a granted call while releasing it now would bunch it up with calls that left late."""
        clock = self._chat.clock
        while True:
            now = clock.now()
            wait = max(self._chat.release_wait(now), self._platform.release_wait(now))
            if wait <= _EPS:
                break
            allowed = max(allowed, now + wait)  # the budget allows it only then
            await clock.sleep(wait)
        self._chat.released(now)
        self._platform.released(now)
        return min(allowed, now)

    @asynccontextmanager
    async def try_sending(self) -> AsyncIterator[bool]:
        """For a background call (typing): yields True -- make the call inside the block --
        only if both budgets have a token free now *and* a place for calls in flight is
        free; otherwise yields False at once and the call is skipped.

        Background calls hold a place in flight like any other: when many turns begin at
        once, their typing calls are the ones a busy event loop would otherwise let
        arrive all together.
        """
        if self._in_flight is not None and self._in_flight.locked():
            yield False
            return
        now = self._chat.clock.now()
        if max(self._chat.release_wait(now), self._platform.release_wait(now)) > _EPS:
            yield False
            return
        if not self._chat.try_take(Priority.BACKGROUND):  # (it leaves the final edit's reserve)
            yield False
            return
        if not self._platform.try_take(Priority.BACKGROUND):
            yield False  # the chat token is spent; being conservative is the point
            return
        if self._shared is not None:
            if not await self._shared.try_admit():
                yield False  # local tokens spent, as above
                return
            if self._in_flight is not None and self._in_flight.locked():  # taken while Redis answered
                yield False
                return
            now = self._chat.clock.now()
        self._chat.released(now)
        self._platform.released(now)
        if self._in_flight is None:
            yield True
            return
        async with self._in_flight:  # free (checked above, nothing awaited since): no wait
            yield True

    def pause(self, seconds: float, *, scope: str = "chat") -> None:
        """Honour a 429: `scope="global"` pauses every chat of this platform (on every
        replica, with shared budgets)."""
        (self._platform if scope == "global" else self._chat).pause(seconds)
        if self._shared is not None:
            self._shared.freeze(seconds, scope=scope)

    @property
    def paused_until(self) -> float:
        return max(self._chat.paused_until, self._platform.paused_until)


@dataclass(frozen=True, slots=True)
class PacingPolicy:
    """The budgets of one platform: private chats, groups, and the whole bot."""

    private: Budget
    group: Budget
    platform: Budget
    # Calls of the whole platform allowed between leaving and being answered. A stalled
    # event loop can let that many arrive bunched on top of a full burst, so it should not
    # exceed the platform's burst minus parley's (Telegram ~30 vs 25). It also caps
    # throughput at in_flight / round-trip time: 100/s at 50 ms, 25/s at 200 ms.
    in_flight: int = 5
    # Tokens of each chat's budget that only final calls (a reply's final edit, a new
    # message) may take; interim edits and typing leave them. Without it the interims
    # spend the whole budget, and the final edit waits up to one interval (1 s in a
    # Telegram private chat, 3.3 s in a group) after the stream ended. Limited to the
    # chat's burst minus one.
    final_reserve: int = 1

    def __post_init__(self) -> None:
        if self.in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        if self.final_reserve < 0:
            raise ValueError("final_reserve must not be negative")


class Pacing:
    """Hands out the one `Pacer` of each chat of a platform.

    `shared`: in cluster mode, the budgets all replicas share (`bots.cluster.budgets`);
    each Pacer then also draws from its chat's part of them, sized from `policy` too.
    """

    _PRUNE_ABOVE = 4096

    def __init__(self, policy: PacingPolicy, clock: Clock = REAL_CLOCK, shared: SharedBudgets | None = None) -> None:
        self.policy = policy
        self.shared = shared
        self._clock = clock
        self._platform: Limiter | None = None
        self._in_flight = asyncio.Semaphore(policy.in_flight)
        self._chats: dict[str, Pacer] = {}

    def for_chat(self, chat: ChatRef) -> Pacer:
        # Forum topics share their group's budget: Telegram limits per chat, not per topic.
        key = f"{chat.platform}:{chat.chat_id}"
        pacer = self._chats.get(key)
        if pacer is None:
            if len(self._chats) > self._PRUNE_ABOVE:
                self._prune()
            budget = self.policy.private if chat.is_private else self.policy.group
            reserve = min(self.policy.final_reserve, budget.burst - 1)
            shared = None if self.shared is None else self.shared.chat(chat, self.policy)
            pacer = Pacer(Limiter(budget, self._clock, reserve=reserve), self._platform_limiter(), self._in_flight, shared)
            self._chats[key] = pacer
        return pacer

    def pause_platform(self, seconds: float) -> None:
        self._platform_limiter().pause(seconds)

    def _platform_limiter(self) -> Limiter:
        if self._platform is None:
            self._platform = Limiter(self.policy.platform, self._clock)
        return self._platform

    def _prune(self) -> None:
        for key in [k for k, p in self._chats.items() if p._chat.idle()]:
            del self._chats[key]
