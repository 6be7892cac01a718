"""Two naive ways to stream a reply into a chat, for comparison with LiveReply.

Both are `TurnEvents` consumers writing through the same `Outbox` parley uses, so the
only difference the latency benchmark sees is the strategy:

- `EveryDelta` -- send on the first delta, then one edit per delta, each awaited in
  order, no budget. What a bot gets when it edits from inside its stream loop.
- `FixedInterval` -- send the first text at once, then edit with the newest text every
  `interval` seconds, make the final edit immediately, and refresh "typing" on its own
  timer: independent throttles and no shared per-chat budget, like hermes-agent's
  stream consumer (reference pitfalls.md, §1).

Errors are counted and ignored -- neither retries, waits out a 429, or checks that the
final text arrived. That is what makes them naive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque

from agent.events import NullEvents
from bots.errors import OutboxError
from bots.outbox import ChatRef, MessageRef, Outbox


class _Naive(NullEvents):
    wants_deltas = True

    def __init__(self, outbox: Outbox, chat: ChatRef) -> None:
        self._outbox = outbox
        self._chat = chat
        self._parts: list[str] = []
        self._ref: MessageRef | None = None
        self._shown: str | None = None
        self.errors: Counter[str] = Counter()

    def text(self) -> str:
        return "".join(self._parts)

    async def _show(self, text: str) -> None:
        """Send (first time) or edit to `text`; a failure is counted and forgotten."""
        try:
            if self._ref is None:
                self._ref = await self._outbox.send(self._chat, text)
            else:
                await self._outbox.edit(self._ref, text)
            self._shown = text
        except OutboxError as exc:
            self.errors[type(exc).__name__] += 1


class EveryDelta(_Naive):
    """One platform call per delta, in order, each awaited before the next."""

    def __init__(self, outbox: Outbox, chat: ChatRef) -> None:
        super().__init__(outbox, chat)
        self._backlog: deque[str] = deque()
        self._wake = asyncio.Event()
        self._done = False
        self._task: asyncio.Task[None] | None = None

    def on_text(self, delta: str) -> None:
        self._parts.append(delta)
        self._backlog.append("".join(self._parts))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._work())

    async def _work(self) -> None:
        while True:
            while self._backlog:
                await self._show(self._backlog.popleft())
            if self._done:
                return
            self._wake.clear()
            await self._wake.wait()

    async def finish(self, final_text: str) -> None:
        if final_text != self.text():
            self._backlog.append(final_text)
        self._done = True
        self._wake.set()
        assert self._task is not None
        await self._task


class FixedInterval(_Naive):
    """First text at once, then an edit every `interval` s; typing on an independent timer."""

    def __init__(self, outbox: Outbox, chat: ChatRef, *, interval: float = 1.0, typing_every: float = 4.0) -> None:
        super().__init__(outbox, chat)
        self._interval = interval
        self._typing_every = typing_every
        self._first = asyncio.Event()
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def on_text(self, delta: str) -> None:
        self._parts.append(delta)
        self._first.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._edit_loop()), asyncio.create_task(self._typing_loop())]

    async def _edit_loop(self) -> None:
        await self._first.wait()
        loop = asyncio.get_running_loop()
        await self._show(self.text())
        tick = loop.time()
        while not self._done.is_set():
            tick += self._interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), max(0.0, tick - loop.time()))
            if self._done.is_set():
                return
            text = self.text()
            if text != self._shown:
                await self._show(text)

    async def _typing_loop(self) -> None:
        while not self._done.is_set():
            try:
                await self._outbox.typing(self._chat)
            except OutboxError as exc:
                self.errors[type(exc).__name__] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), self._typing_every)

    async def finish(self, final_text: str) -> None:
        self._parts[:] = [final_text]
        self._done.set()
        self._first.set()
        await asyncio.gather(*self._tasks)
        if self._shown != final_text:
            await self._show(final_text)
