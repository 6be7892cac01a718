"""Outbound rate budgets shared by every replica, through Redis, with the `limits` library.

Each replica paces its chats with its own `Pacing` (bots/pacing.py). That is exact for one
process, but N replicas would each spend the whole bot budget -- N x 30 calls/s to
Telegram is flood control. So in cluster mode a call also takes one token from budgets
all replicas share: the bot's (per platform) and the chat's. The local Pacer keeps its
semantics (priorities, coalescing interim edits, the final reserve); only a second,
shared gate is added after its local grant.

Why a moving window (`limits.aio.strategies.MovingWindowRateLimiter`): it is the only
`limits` strategy that is exact -- it counts the calls in *any* window of the length, as
the platforms do ("at most 20 messages per minute to a group"). A fixed window lets two
windows' worth through across a boundary (2 x 30 within a second is exactly the flood a
shared budget exists to prevent); the sliding-window counter only approximates. Its
cost, one Redis list of at most `burst` timestamps per budget, is small for these
limits. A `Budget(rate, burst)` becomes "at most `burst` calls in any
ceil(burst / rate) seconds" (`moving_window`), which never allows more than the token
bucket does: Telegram's bot budget (25/s, burst 25) is 25 in any second, a private chat
(1/s, burst 2) 2 in any 2 s, a group (0.3/s, burst 2) 2 in any 7 s. (`limits` windows
are whole seconds, so a rate is rounded down, never up.)

Why this shape around it:

- Priorities: within a replica, calls that must wait for the shared bot budget wait in
  (priority, arrival) order, one of them retrying at a time (`_Turnstile`), so a final
  edit still goes before interim edits. Across replicas Redis keeps no order; a chat's
  turns run on one replica at a time, so its own calls stay ordered where it matters.
- Waiting costs no polling: a refused call asks for the window's oldest entry and sleeps
  until that entry leaves the window, then tries again.
- A 429's `retry_after` is published as a key with an expiry (`SET ... PX`) holding the
  moment the freeze ends (wall-clock ms; replicas need synchronised clocks, which the
  moving window's timestamps need anyway); every admission reads the bot's and the
  chat's freeze first (one MGET) and waits until then.
- Redis down must never fail a send: every Redis call has short timeouts and no retries,
  and the first failure switches this replica to local budgets of 1/N of every limit (N
  = live replicas) in `limits`' memory storage -- one WARNING line, `status()` says so
  -- and a probe every few seconds (never on the send path) switches back, with one
  INFO line. So a dead Redis costs one send at most ~0.5 s, once.

Round trips per call: one MGET (freezes), one script per budget (chat, bot); more only
when a budget is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import coredis
from coredis.retry import NoRetryPolicy
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from agent.urls import url_without_secrets
from bots.outbox import ChatRef
from bots.pacing import Budget, PacingPolicy, Priority

__all__ = ["ChatBudget", "SharedBudgets", "moving_window"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 0.25
"""Seconds to open a connection to Redis: a dead or unroutable Redis is noticed this fast."""
OPERATION_TIMEOUT = 0.5
"""Seconds one Redis call may take before this replica falls back to local budgets."""
PROBE_EVERY = 3.0
"""Seconds between checks whether Redis is back, while on local budgets."""

_T = TypeVar("_T")
_MIN_SLEEP = 0.001  # a refused call whose window already moved on tries again after this
_FORGET_FROZEN_ABOVE = 4096  # freezes this replica remembers before it drops the ended ones
FREEZE_RECHECK = 0.25
"""Seconds a replica trusts what it last read of the shared freezes of a chat (and of the
bot) before reading them from Redis again. A 429 is rare once budgets are shared; reading
both freeze keys before every call was a third of all Redis round trips. A freeze this
replica set itself applies at once; one set by another replica, within this long."""

# Sets the freeze only if it ends later than the one already there: a short chat freeze
# must not cut a long one short. ARGV: the end (epoch ms), the expiry (ms).
_FREEZE_SCRIPT = """
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


def moving_window(budget: Budget, share: int = 1) -> RateLimitItem:
    """`budget` (or its 1/`share` part) as a `limits` moving window.

    At most `burst` calls in any `ceil(burst / rate)` seconds: the same sustained rate
    (rounded down to whole-second windows) and never more at once than the bucket's
    burst. A share of 1/N takes `rate / N` and `burst // N` (at least 1), so N replicas
    on their shares never exceed the whole budget together.
    """
    rate = budget.rate / max(1, share)
    burst = max(1, budget.burst // max(1, share))
    seconds = max(1, math.ceil(burst / rate - 1e-9))
    return RateLimitItemPerSecond(burst, seconds, namespace="budget")


@dataclass(frozen=True, slots=True)
class _Items:
    """A platform's budgets as moving windows."""

    bot: RateLimitItem
    private: RateLimitItem
    group: RateLimitItem

    @classmethod
    def of(cls, policy: PacingPolicy, share: int = 1) -> _Items:
        return cls(
            moving_window(policy.platform, share), moving_window(policy.private, share), moving_window(policy.group, share)
        )


class _Turnstile:
    """Calls of this replica waiting for a platform's shared bot budget, in (priority,
    arrival) order: only the one in turn talks to Redis (trying, then sleeping until the
    window's oldest call leaves it); the next is let in when it got its token."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def idle(self) -> bool:
        return not self._busy and not self._waiting

    @contextlib.asynccontextmanager
    async def turn(self, priority: Priority) -> AsyncIterator[None]:
        if self._busy:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (int(priority), next(self._seq), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed the turn, cancelled before taking it
                    self._next()
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)
                return
        self._busy = False


@dataclass(eq=False)
class _Platform:
    policy: PacingPolicy
    items: _Items
    turnstile: _Turnstile = field(default_factory=_Turnstile)
    local_items: dict[int, _Items] = field(default_factory=dict)  # by share

    def shared_items(self, share: int) -> _Items:
        items = self.local_items.get(share)
        if items is None:
            items = self.local_items[share] = _Items.of(self.policy, share)
        return items


class SharedBudgets:
    """The per-bot and per-chat outbound budgets of every platform, shared by all replicas.

        budgets = SharedBudgets("redis://redis:6379/0", "parley:prod:", live_replicas=lambda: 3)
        connector = TelegramConnector(token, pacing=policy, shared_budgets=budgets)
        ...
        budgets.status()   # None, or "Redis unreachable (ConnectionError); local budgets of 1/3 each"
        await budgets.aclose()

    A platform's budgets come from its `PacingPolicy`, registered by the connector's
    `Pacing` on first use (or up front with `policies=` / `register`), so cluster mode
    uses the very numbers single-process mode does.

    `waits` / `waited_seconds` count admissions that had to wait for a shared budget or a
    freeze (for /metrics); `on_wait(platform, seconds)` is called for each such wait.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str,
        live_replicas: Callable[[], int],
        *,
        policies: dict[str, PacingPolicy] | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        operation_timeout: float = OPERATION_TIMEOUT,
        probe_every: float = PROBE_EVERY,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self._url_shown = url_without_secrets(redis_url)
        self._prefix = key_prefix.rstrip(":")
        self._live_replicas = live_replicas
        self._timeout = operation_timeout
        self._probe_every = probe_every
        self.on_wait = on_wait
        self._redis: coredis.Redis[bytes] = coredis.Redis.from_url(
            redis_url,
            connect_timeout=connect_timeout,
            stream_timeout=operation_timeout,
            retry_policy=NoRetryPolicy(),
        )
        storage_url = redis_url if redis_url.startswith("async+") else f"async+{redis_url}"
        self._storage = RedisStorage(
            storage_url,
            key_prefix=self._prefix,
            connection_pool=self._redis.connection_pool,  # type: ignore[arg-type]
            retry_policy=NoRetryPolicy(),  # type: ignore[arg-type]
        )
        self._shared = MovingWindowRateLimiter(self._storage)
        self._memory = MemoryStorage()
        self._local = MovingWindowRateLimiter(self._memory)
        self._freeze_script = self._redis.register_script(_FREEZE_SCRIPT)
        self._platforms: dict[str, _Platform] = {}
        self._frozen: dict[str, float] = {}  # freeze key -> end (epoch s), as this replica knows it
        self._freeze_read: dict[str, float] = {}  # freeze key -> loop time it was last read from Redis
        self._down: str | None = None  # why Redis is not used right now; None while it is
        self._probe: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.waits = 0
        self.waited_seconds = 0.0
        for platform, policy in (policies or {}).items():
            self.register(platform, policy)

    # ------------------------------------------------------------------ configuration

    def register(self, platform: str, policy: PacingPolicy) -> None:
        """Use `policy`'s budgets for `platform` (idempotent; a different policy replaces it)."""
        known = self._platforms.get(platform)
        if known is None or known.policy != policy:
            self._platforms[platform] = _Platform(policy, _Items.of(policy))

    def chat(self, chat: ChatRef, policy: PacingPolicy) -> ChatBudget:
        """The shared budget of one chat, as its `Pacer` uses it (registers `policy` first)."""
        known = self._platforms.get(chat.platform)
        if known is None or known.policy != policy:
            self.register(chat.platform, policy)
        return ChatBudget(self, chat.platform, str(chat.chat_id), chat.is_private)

    @property
    def share(self) -> int:
        """N of the 1/N local budgets: the live replicas, at least 1."""
        try:
            return max(1, int(self._live_replicas()))
        except Exception:  # a broken counter must not stop sends
            log.debug("shared budgets: live_replicas() failed; assuming 1", exc_info=True)
            return 1

    # ------------------------------------------------------------------ admission

    async def admit(
        self, platform: str, chat_key: str, *, private: bool, priority: Priority = Priority.FINAL
    ) -> float:
        """Wait until the platform's frozen time is over and both the bot's and the chat's
        shared budget allow one call; take one token of each. Returns the seconds waited
        (0.0 when the call could go at once). Never raises for Redis trouble."""
        plat = self._platform(platform)
        while True:
            shared = self._down is None
            try:
                slept = await self._admit(plat, platform, chat_key, private, priority, shared=shared)
                break
            except Exception as exc:  # Redis trouble of any kind: never fail the send
                if not shared:
                    raise
                self._degrade(exc)
        if slept > 0:
            self.waits += 1
            self.waited_seconds += slept
            if self.on_wait is not None:
                self.on_wait(platform, slept)
        return slept

    async def try_admit(self, platform: str, chat_key: str, *, private: bool) -> bool:
        """For a background call (typing): take a token of both budgets only if both have
        one now, nothing is frozen and no call of this replica waits for the bot budget;
        never waits. A refused bot token after a granted chat token leaves the chat token
        spent (conservative, as the local Pacer is)."""
        plat = self._platform(platform)
        while True:
            shared = self._down is None
            try:
                return await self._try_admit(plat, platform, chat_key, private, shared=shared)
            except Exception as exc:
                if not shared:
                    raise
                self._degrade(exc)

    def freeze(self, platform: str, seconds: float, chat_key: str | None = None) -> None:
        """Honour a 429 on every replica: nothing goes to the chat (`chat_key`) -- or to any
        chat of the platform (None, a global 429) -- for `seconds`. Published to Redis in
        the background; this replica honours it at once."""
        if seconds <= 0:
            return
        key = self._freeze_key(platform, chat_key)
        until = time.time() + seconds
        if until > self._frozen.get(key, 0.0):
            if len(self._frozen) > _FORGET_FROZEN_ABOVE:
                now = time.time()
                self._frozen = {k: v for k, v in self._frozen.items() if v > now}
            self._frozen[key] = until
        if self._down is None and not self._closed:
            task = asyncio.get_running_loop().create_task(self._publish_freeze(key, until, seconds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Wait until every freeze given so far is published (or found unpublishable)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ health

    def status(self) -> str | None:
        """None while the budgets are shared; otherwise one line saying why not."""
        if self._down is None:
            return None
        return f"Redis unreachable ({self._down}); local budgets of 1/{self.share} each"

    async def probe(self) -> bool:
        """Check Redis now (e.g. at start, to report early); True when it answers. A
        failure switches to local budgets as a failed call would."""
        try:
            await self._call(self._redis.ping())
        except Exception as exc:
            self._degrade(exc)
            return False
        self._recover()
        return True

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        if self._probe is not None:
            tasks.append(self._probe)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        timer = getattr(self._memory, "timer", None)
        if timer is not None and not timer.done():
            timer.cancel()
        self._redis.connection_pool.disconnect()

    # ------------------------------------------------------------------ internals

    def _platform(self, platform: str) -> _Platform:
        plat = self._platforms.get(platform)
        if plat is None:
            raise KeyError(f"shared budgets: no pacing policy registered for {platform!r}")
        return plat

    def _freeze_key(self, platform: str, chat_key: str | None) -> str:
        base = f"{self._prefix}:frozen/{platform}"
        return base if chat_key is None else f"{base}/chat/{chat_key}"

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        """One Redis call, bounded by the operation timeout whatever the client does."""
        async with asyncio.timeout(self._timeout):
            return await awaitable

    async def _frozen_until(self, platform: str, chat_key: str, *, shared: bool) -> float:
        """The end (epoch s) of the later of the bot's and the chat's freeze; 0 if none."""
        keys = [self._freeze_key(platform, None), self._freeze_key(platform, chat_key)]
        now = time.monotonic()
        stale = [k for k in keys if now - self._freeze_read.get(k, -FREEZE_RECHECK) >= FREEZE_RECHECK]
        if shared and stale:
            values = await self._call(self._redis.mget(stale))
            if len(self._freeze_read) > _FORGET_FROZEN_ABOVE:
                self._freeze_read = {k: t for k, t in self._freeze_read.items() if now - t < FREEZE_RECHECK}
            for key, value in zip(stale, values):
                self._freeze_read[key] = now
                if value is not None and float(value) / 1000.0 > self._frozen.get(key, 0.0):
                    self._frozen[key] = float(value) / 1000.0
        return max(self._frozen.get(keys[0], 0.0), self._frozen.get(keys[1], 0.0))

    async def _sleep_until(self, until: float) -> float:
        delay = max(_MIN_SLEEP, until - time.time())
        await asyncio.sleep(delay)
        return delay

    async def _sleep_for_window(
        self, limiter: MovingWindowRateLimiter, item: RateLimitItem, *ids: str, shared: bool, spread: bool = False
    ) -> float:
        """Sleep until the oldest call in the window leaves it (a place is free then).

        `spread` (the bot's budget, which every replica draws from at once): the waiting
        calls of the other replicas would wake at that same moment and race for the one
        place, the losers asking Redis again and again. So each replica wakes at a random
        point of the next `share` places' worth of time instead: they take turns at the pace
        the budget allows, each asking about once per place. (A chat's calls come from the
        one replica working on its conversation: nobody to race.)
        """
        if shared:
            stats = await self._call(limiter.get_window_stats(item, *ids))
            jitter = (self.share - 1) * item.get_expiry() / item.amount if spread else 0.0
            return await self._sleep_until(stats.reset_time + random.uniform(0.0, jitter))
        stats = await limiter.get_window_stats(item, *ids)
        return await self._sleep_until(stats.reset_time)

    async def _hit(self, limiter: MovingWindowRateLimiter, item: RateLimitItem, *ids: str, shared: bool) -> bool:
        if shared:
            return await self._call(limiter.hit(item, *ids))
        return await limiter.hit(item, *ids)

    async def _admit(
        self, plat: _Platform, platform: str, chat_key: str, private: bool, priority: Priority, *, shared: bool
    ) -> float:
        limiter = self._shared if shared else self._local
        items = plat.items if shared else plat.shared_items(self.share)
        slept = 0.0
        until = await self._frozen_until(platform, chat_key, shared=shared)
        while until > time.time():
            slept += await self._sleep_until(until)
            until = await self._frozen_until(platform, chat_key, shared=shared)
        chat_item = items.private if private else items.group
        while not await self._hit(limiter, chat_item, platform, "chat", chat_key, shared=shared):
            slept += await self._sleep_for_window(limiter, chat_item, platform, "chat", chat_key, shared=shared)
        turnstile = plat.turnstile
        if turnstile.idle and await self._hit(limiter, items.bot, platform, "bot", shared=shared):
            return slept
        async with turnstile.turn(priority):
            while not await self._hit(limiter, items.bot, platform, "bot", shared=shared):
                slept += await self._sleep_for_window(limiter, items.bot, platform, "bot", shared=shared, spread=True)
        return max(slept, _MIN_SLEEP)  # it queued behind this replica's other calls: a wait

    async def _try_admit(self, plat: _Platform, platform: str, chat_key: str, private: bool, *, shared: bool) -> bool:
        if not plat.turnstile.idle:
            return False
        if await self._frozen_until(platform, chat_key, shared=shared) > time.time():
            return False
        limiter = self._shared if shared else self._local
        items = plat.items if shared else plat.shared_items(self.share)
        chat_item = items.private if private else items.group
        if not await self._hit(limiter, chat_item, platform, "chat", chat_key, shared=shared):
            return False
        return plat.turnstile.idle and await self._hit(limiter, items.bot, platform, "bot", shared=shared)

    async def _publish_freeze(self, key: str, until: float, seconds: float) -> None:
        try:
            await self._call(self._freeze_script.execute([key], [int(until * 1000), max(1, math.ceil(seconds * 1000))]))
        except Exception as exc:
            self._degrade(exc)

    def _degrade(self, exc: BaseException) -> None:
        """Redis failed: local budgets of 1/N from now on, until the probe finds it back."""
        if self._closed:
            return
        cause = type(exc).__name__
        if self._down is None:
            self._down = cause
            log.warning(
                "shared budgets: Redis at %s unreachable (%s); this replica keeps local budgets of 1/%d "
                "of every limit until it is back",
                self._url_shown, cause, self.share,
            )  # fmt: skip
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back(), name="shared-budgets-probe")

    def _recover(self) -> None:
        if self._down is not None:
            self._down = None
            log.info("shared budgets: Redis at %s reachable again; budgets are shared again", self._url_shown)

    async def _probe_until_back(self) -> None:
        while self._down is not None and not self._closed:
            await asyncio.sleep(self._probe_every)
            try:
                await self._call(self._redis.ping())
            except Exception:
                continue
            self._recover()


@dataclass(frozen=True, slots=True)
class ChatBudget:
    """One chat's view of the shared budgets: what its `Pacer` draws from."""

    budgets: SharedBudgets
    platform: str
    chat_key: str
    private: bool

    async def admit(self, priority: Priority = Priority.FINAL) -> float:
        return await self.budgets.admit(self.platform, self.chat_key, private=self.private, priority=priority)

    async def try_admit(self) -> bool:
        return await self.budgets.try_admit(self.platform, self.chat_key, private=self.private)

    def freeze(self, seconds: float, *, scope: str = "chat") -> None:
        self.budgets.freeze(self.platform, seconds, None if scope == "global" else self.chat_key)
