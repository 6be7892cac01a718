"""A virtual clock for deterministic tests of time-dependent logic (bots.clock.Clock)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Callable


class _Timer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time moves only when the test calls `advance`; timers fire in order as it passes."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    async def sleep(self, delay: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.call_at(self._now + max(0.0, delay), lambda: fut.done() or fut.set_result(None))
        await fut

    async def settle(self) -> None:
        """Let every task that can run without time passing run (no wall-clock waiting)."""
        for _ in range(100):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers one by one and letting tasks react to each."""
        target = self._now + seconds
        await self.settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, when)
            callback()
            await self.settle()
        self._now = target
        await self.settle()
