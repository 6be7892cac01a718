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
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass
from enum import IntEnum

from bots.clock import REAL_CLOCK, Clock, TimerHandle
from bots.outbox import ChatRef

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
    """

    def __init__(self, budget: Budget, clock: Clock = REAL_CLOCK) -> None:
        self._rate = budget.rate
        self._capacity = float(budget.burst)
        self._clock = clock
        self._tokens = self._capacity
        self._stamp = float("-inf")  # a new bucket is full
        self._paused_until = float("-inf")
        self._waiters: list[tuple[int, int, asyncio.Future[float]]] = []
        self._seq = itertools.count()
        self._timer: TimerHandle | None = None

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, fut in self._waiters if not fut.done())

    def idle(self) -> bool:
        """True when forgetting this bucket loses nothing (full, not paused, nobody waiting)."""
        now = self._clock.now()
        self._refill(now)
        return not self._waiters and now >= self._paused_until and self._tokens >= self._capacity - _EPS

    def try_take(self) -> bool:
        """Take a token only if one is free right now and nobody is queued ahead."""
        now = self._clock.now()
        if self._waiters or now < self._paused_until:
            return False
        self._refill(now)
        if self._tokens >= 1 - _EPS:
            self._tokens -= 1
            return True
        return False

    async def take(self, priority: Priority = Priority.FINAL) -> float:
        """Wait for a token; returns the time at which the budget allowed the call."""
        if self.try_take():
            return self._clock.now()
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), fut))
        self._arm()
        return await fut

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

    def _ready_at(self, now: float) -> float:
        self._refill(now)
        when = max(now, self._paused_until)
        if self._tokens < 1 - _EPS:
            when = max(when, self._stamp + (1 - self._tokens) / self._rate)
        return when

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        if self._waiters:
            self._timer = self._clock.call_at(self._ready_at(self._clock.now()), self._dispatch)

    def _dispatch(self) -> None:
        self._timer = None
        now = self._clock.now()
        self._refill(now)
        while self._waiters and now >= self._paused_until - _EPS and self._tokens >= 1 - _EPS:
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():  # the waiter was cancelled
                continue
            self._tokens -= 1
            fut.set_result(now)
        self._arm()


class Pacer:
    """The budget of one chat, drawing from the platform-wide budget too."""

    def __init__(self, chat: Limiter, platform: Limiter) -> None:
        self._chat = chat
        self._platform = platform

    async def acquire(self, priority: Priority = Priority.FINAL) -> float:
        """Wait until both budgets allow one call; returns when they allowed it."""
        await self._chat.take(priority)
        return await self._platform.take(priority)

    def try_acquire(self) -> bool:
        """A background call (typing) goes only if both budgets have a token free now."""
        if not self._chat.try_take():
            return False
        if not self._platform.try_take():
            return False  # the chat token is spent; being conservative is the point
        return True

    def pause(self, seconds: float, *, scope: str = "chat") -> None:
        """Honour a 429: `scope="global"` pauses every chat of this platform."""
        (self._platform if scope == "global" else self._chat).pause(seconds)

    @property
    def paused_until(self) -> float:
        return max(self._chat.paused_until, self._platform.paused_until)


@dataclass(frozen=True, slots=True)
class PacingPolicy:
    """The budgets of one platform: private chats, groups, and the whole bot."""

    private: Budget
    group: Budget
    platform: Budget


class Pacing:
    """Hands out the one `Pacer` of each chat of a platform."""

    _PRUNE_ABOVE = 4096

    def __init__(self, policy: PacingPolicy, clock: Clock = REAL_CLOCK) -> None:
        self.policy = policy
        self._clock = clock
        self._platform: Limiter | None = None
        self._chats: dict[str, Pacer] = {}

    def for_chat(self, chat: ChatRef) -> Pacer:
        # Forum topics share their group's budget: Telegram limits per chat, not per topic.
        key = f"{chat.platform}:{chat.chat_id}"
        pacer = self._chats.get(key)
        if pacer is None:
            if len(self._chats) > self._PRUNE_ABOVE:
                self._prune()
            budget = self.policy.private if chat.is_private else self.policy.group
            pacer = Pacer(Limiter(budget, self._clock), self._platform_limiter())
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
