"""The streaming surface of a turn: a short list of callbacks.

The agent knows nothing about chats. Everything a chat shows while a turn runs comes
through a `TurnEvents` object handed to `Agent.run_turn`. Callbacks are synchronous,
cheap and must never block: a consumer appends to a buffer and wakes its own flusher.
That keeps the provider's read loop free of platform latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(slots=True)
class ToolCall:
    """One tool call the model asked for (arguments are the raw JSON string)."""

    id: str
    name: str
    arguments: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ToolResult:
    """What a tool returned, as the text the model will read."""

    call_id: str
    name: str
    content: str
    is_error: bool = False
    denied: bool = False  # not run: the approver said no (or nobody answered in time)


@dataclass(frozen=True, slots=True)
class Approval:
    """An approver's decision on one tool call. `reason` is told to the model when not granted."""

    granted: bool
    reason: str = ""


class Approver(Protocol):
    """Decides, before a tool call runs, whether it may (the chat side asks with buttons).

    The turn awaits `approve` for every call that passed validation, one call at a time,
    before any of that response's calls start; an approver that needs no one's answer for
    a call returns at once. Cancellation (an interrupt, /stop) propagates: the approver
    cleans up whatever it showed and re-raises. `arguments` are the parsed JSON object.
    """

    async def approve(self, call: ToolCall, arguments: dict[str, Any]) -> Approval: ...


@runtime_checkable
class TurnEvents(Protocol):
    """Callbacks fired while a turn runs.

    Contract:
    - `on_text` receives visible answer text in order. Text a model response streams
      *after* its first tool-call delta is not emitted (it stays in the content).
    - `on_reasoning` receives reasoning/thinking text, never mixed into `on_text`.
    - `on_first_delta` fires exactly once per model call, at the first content-bearing
      delta (text, reasoning or tool call).
    - `on_tool_started` / `on_tool_finished` bracket each tool execution. A call that
      never runs -- its arguments were invalid, its tool unknown, or its approval denied
      (`ToolResult.denied`) -- gets `on_tool_finished` alone, with the error result.
    - `on_fallback(final_text)` fires when a model call's stream broke and the step was
      answered by a non-streaming request: `final_text` is that response's complete
      visible text, and replaces whatever this response streamed so far.
    - `wants_deltas` tells the agent whether anyone consumes the stream; when False the
      agent may skip streaming altogether.
    """

    wants_deltas: bool

    def on_text(self, delta: str) -> None: ...

    def on_reasoning(self, delta: str) -> None: ...

    def on_first_delta(self) -> None: ...

    def on_tool_started(self, call: ToolCall) -> None: ...

    def on_tool_finished(self, call: ToolCall, result: ToolResult) -> None: ...

    def on_fallback(self, final_text: str) -> None: ...


class NullEvents:
    """A consumer that ignores everything; subclass it and override what you need."""

    wants_deltas: bool = False

    def on_text(self, delta: str) -> None:
        pass

    def on_reasoning(self, delta: str) -> None:
        pass

    def on_first_delta(self) -> None:
        pass

    def on_tool_started(self, call: ToolCall) -> None:
        pass

    def on_tool_finished(self, call: ToolCall, result: ToolResult) -> None:
        pass

    def on_fallback(self, final_text: str) -> None:
        pass
