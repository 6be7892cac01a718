"""Time as a dependency.

Pacing, retry-after pauses and typing refreshes all depend on time. Passing a `Clock`
instead of calling `asyncio.sleep` / `loop.time()` directly lets the tests drive that
logic with a virtual clock: fast, deterministic, and free of sleep-and-hope timing.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic seconds, timers and sleeping."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...

    async def sleep(self, delay: float) -> None: ...


class LoopClock:
    """The real clock: the running event loop's monotonic time and timers."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_at(when, callback)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))


REAL_CLOCK: Clock = LoopClock()
