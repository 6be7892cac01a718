"""pytest fixtures for the fake OpenAI-compatible provider (registered by tests/conftest.py).

    async def test_something(fake_llm, recording_events):
        fake_llm.script(Reply.text("Hello world"))
        agent = Agent(fake_llm.config(), tools=ToolRegistry())
        result = await agent.run_turn([], "hi", recording_events)
        assert recording_events.text == "Hello world"

- `fake_llm`: a started `FakeLLM` on a free 127.0.0.1 port (function-scoped, like the loop).
- `fake_llm_config`: `fake_llm.config()` — a ProviderConfig pointing at it with short
  timeouts and `max_retries=0`.
- `llm`: a started `CrashLLM` (tests/support/crash.py: every question answered with
  `answer_for(question)`, replies that can be held), released after the test -- the crash,
  outage and cluster tests' provider.
- `recording_events`: a `RecordingEvents` (a `TurnEvents` that records every callback and
  lets a test `await events.wait_for(predicate)` instead of sleeping).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agent import NullEvents, ToolCall, ToolResult
from tests.fakes.llm import FakeLLM


class RecordingEvents(NullEvents):
    """Records every TurnEvents callback in order (`log`), with conveniences for asserts."""

    def __init__(self, wants_deltas: bool = True) -> None:
        self.wants_deltas = wants_deltas
        self.log: list[tuple[Any, ...]] = []
        self.deltas: list[str] = []
        self.reasoning_deltas: list[str] = []
        self.first_deltas = 0
        self.fallbacks: list[str] = []
        self.started: list[ToolCall] = []
        self.finished: list[tuple[ToolCall, ToolResult]] = []
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_deltas)

    def _add(self, *entry: Any) -> None:
        self.log.append(entry)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def on_text(self, delta: str) -> None:
        self.deltas.append(delta)
        self._add("text", delta)

    def on_reasoning(self, delta: str) -> None:
        self.reasoning_deltas.append(delta)
        self._add("reasoning", delta)

    def on_first_delta(self) -> None:
        self.first_deltas += 1
        self._add("first")

    def on_tool_started(self, call: ToolCall) -> None:
        self.started.append(call)
        self._add("tool_started", call.name)

    def on_tool_finished(self, call: ToolCall, result: ToolResult) -> None:
        self.finished.append((call, result))
        self._add("tool_finished", call.name, result.is_error)

    def on_fallback(self, final_text: str) -> None:
        self.fallbacks.append(final_text)
        self._add("fallback", final_text)

    def kinds(self) -> list[str]:
        return [entry[0] for entry in self.log]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds; re-checked after every callback."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise AssertionError(f"events.wait_for timed out after {timeout}s; log: {self.log}") from None


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as fake:
        yield fake


@pytest.fixture
async def llm() -> AsyncIterator[Any]:
    from tests.support.crash import CrashLLM

    async with CrashLLM() as fake:
        try:
            yield fake
        finally:
            fake.release()


@pytest.fixture
def fake_llm_config(fake_llm: FakeLLM) -> Any:
    return fake_llm.config()


@pytest.fixture
def recording_events() -> RecordingEvents:
    return RecordingEvents()
