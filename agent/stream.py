"""Accumulators: turn a provider's stream into the shape of a non-streaming response.

We do not use the SDK's `.stream()` helpers: `ChatCompletionStreamState` concatenates
every string it sees, so repeated ids become `call_acall_a`, Ollama's parallel calls on
`index: 0` merge into garbage and a tool delta without `index` raises `TypeError`
(reference `llm-streaming.md` §3, §5). These accumulators follow the rules of §7.1:

- tool calls keyed by `index`; a missing index continues the open call; the same index
  with a *different* id *and* a name opens a new call (Ollama); `id`, `name`, `type`
  are assigned, never concatenated; integer ids become strings; `arguments` fragments
  go to a list joined once;
- reasoning per delta from `reasoning_content` *or* `reasoning`, never both;
- usage is replaced by the latest object, never summed;
- the final finish reason is "error" > "length"/"content_filter" > "tool_calls" (when
  calls accumulated) > last seen; a stream without any finish reason is truncated.

They take plain dicts -- the `json.loads` of each SSE `data:` line (`agent/sse.py`) --
not the SDK's chunk models: building a model per chunk was most of parley's CPU under
load. They also drive the text events: deltas before the first tool-call delta of a
response are emitted through `on_text`; later text is only accumulated. This is the
per-chunk hot path, so it does no allocation beyond the list appends it needs.

The `response_from_*` converters take either shape (the SDK's parsed non-streaming
objects, or the dict of a JSON body that answered a stream request).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ProviderBadResponse
from .events import ToolCall
from .tokens import text_tokens

__all__ = [
    "ChatAccumulator",
    "ModelResponse",
    "ResponsesAccumulator",
    "StreamBroken",
    "Usage",
    "final_finish_reason",
    "response_from_chat_completion",
    "response_from_responses",
]

def _noop(*_args: Any) -> None:
    return None


class StreamBroken(Exception):
    """A stream turned out unusable; `cause` is a short machine-readable reason.

    Internal to the agent: the provider answers it with a non-streaming request.
    """

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.detail = detail


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Read `name` from an SDK object or a plain dict (providers send both shapes)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    value = getattr(obj, name, default)
    if value is None:
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra:
            return extra.get(name, default)
    return value


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


@dataclass(slots=True)
class Usage:
    """Token counts. Within one stream the latest report wins; across calls they add up.

    `estimated_tokens`: how many of `prompt_tokens + completion_tokens` are parley's
    estimate (`agent.tokens`) rather than the provider's report -- calls whose stream
    was cut before the provider said what it used. 0: all reported.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.total_tokens + other.total_tokens,
            self.estimated_tokens + other.estimated_tokens,
        )

    @property
    def estimated(self) -> bool:
        """Whether any of these numbers is an estimate."""
        return self.estimated_tokens > 0

    @classmethod
    def estimate(cls, prompt: int, response: ModelResponse, model: str | None = None) -> Usage:
        """What a call probably used: `prompt` (estimated) and what `response` holds so far.

        Everything the model generated counts as completion -- text, reasoning, tool-call
        names and arguments -- as providers count it; reasoning also as reasoning tokens.
        `model`: the model asked, whose tokenizer counts the text when parley has it
        (`agent.tokens`); characters / 4 otherwise.
        """
        reasoning = text_tokens(response.reasoning, model)
        completion = text_tokens(response.content, model) + reasoning
        for call in response.tool_calls:
            completion += text_tokens(call.name, model) + text_tokens(call.arguments, model)
        total = prompt + completion
        return cls(prompt, completion, reasoning, total, total)

    @classmethod
    def from_provider(cls, obj: Any) -> Usage | None:
        """Build from a Chat Completions (`prompt_tokens`…) or Responses (`input_tokens`…) usage object."""
        if obj is None:
            return None
        prompt = _get(obj, "prompt_tokens")
        if prompt is None:
            prompt = _get(obj, "input_tokens")
        completion = _get(obj, "completion_tokens")
        if completion is None:
            completion = _get(obj, "output_tokens")
        details = _get(obj, "completion_tokens_details") or _get(obj, "output_tokens_details")
        reasoning = _get(details, "reasoning_tokens") if details is not None else None
        prompt_i, completion_i = _int(prompt), _int(completion)
        total = _get(obj, "total_tokens")
        total_i = _int(total) if total is not None else prompt_i + completion_i
        return cls(prompt_i, completion_i, _int(reasoning), total_i)


@dataclass(slots=True)
class ModelResponse:
    """One model call's outcome, the same shape whether it was streamed or not."""

    content: str = ""
    visible_text: str = ""  # what streaming shows: the text before the first tool call
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    complete: bool = True
    fell_back: bool = False
    fallback_cause: str | None = None

    def assistant_message(self) -> dict[str, Any]:
        """The Chat Completions assistant message to persist and send back next step."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                item: dict[str, Any] = {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                if call.extra:
                    item.update(call.extra)  # e.g. Gemini's extra_content.thought_signature
                calls.append(item)
            message["tool_calls"] = calls
        elif message["content"] is None:
            message["content"] = ""
        return message


def final_finish_reason(seen: list[str], has_tool_calls: bool) -> str | None:
    """Pick the finish reason that tells the truth (§7.1.5); never trust a lone "stop"."""
    if not seen:
        return None
    if "error" in seen:
        return "error"
    for reason in ("length", "content_filter"):
        if reason in seen:
            return reason
    if has_tool_calls:
        return "tool_calls"
    return seen[-1]


class _Slot:
    """One tool call being assembled."""

    __slots__ = ("index", "id", "name", "type", "args", "extra")

    def __init__(self, index: Any) -> None:
        self.index = index
        self.id: str | None = None
        self.name: str | None = None
        self.type: str | None = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}

    def to_call(self, position: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{position}",
            name=self.name or "",
            arguments="".join(self.args),
            extra=self.extra,
        )


class _Base:
    """State and event plumbing shared by both API modes."""

    def __init__(
        self,
        on_text: Callable[[str], Any] | None = None,
        on_reasoning: Callable[[str], Any] | None = None,
        on_first: Callable[[], Any] | None = None,
    ) -> None:
        self.content_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        # len(content_parts) when the first tool-call delta arrived; None while none has.
        self.visible_count: int | None = None
        self.slots: list[_Slot] = []
        self.finish_reasons: list[str] = []
        self.usage_obj: Any = None
        self.model: str | None = None
        self.started = False  # a content-bearing delta (text, reasoning, tool call) arrived
        self.chunks = 0
        self._on_text = on_text or _noop
        self._on_reasoning = on_reasoning or _noop
        self._on_first = on_first or _noop

    def _first(self) -> None:
        self.started = True
        self._on_first()

    def _tool_seen(self) -> None:
        if not self.started:
            self._first()
        if self.visible_count is None:
            self.visible_count = len(self.content_parts)

    def _reasoning(self, text: str) -> None:
        if not self.started:
            self._first()
        self.reasoning_parts.append(text)
        self._on_reasoning(text)

    @property
    def visible_text(self) -> str:
        """The text a consumer has been shown so far (pre-tool-call text only)."""
        parts = self.content_parts
        if self.visible_count is not None:
            parts = parts[: self.visible_count]
        return "".join(parts)

    @property
    def has_finish(self) -> bool:
        return bool(self.finish_reasons)

    def result(self) -> ModelResponse:
        calls = [slot.to_call(i) for i, slot in enumerate(self.slots)]
        return ModelResponse(
            content="".join(self.content_parts),
            visible_text=self.visible_text,
            tool_calls=calls,
            reasoning="".join(self.reasoning_parts),
            finish_reason=final_finish_reason(self.finish_reasons, bool(calls)),
            usage=Usage.from_provider(self.usage_obj),
            model=self.model,
            complete=bool(self.finish_reasons),
        )


class ChatAccumulator(_Base):
    """Accumulates Chat Completions chunks: the `json.loads` of each SSE `data:` (plain dicts).

    Shapes no provider sends (a `delta` that is not an object, `choices` that is not a
    list) raise `TypeError`/`AttributeError`/`KeyError`, which the provider reports as a
    malformed chunk.
    """

    def __init__(
        self,
        on_text: Callable[[str], Any] | None = None,
        on_reasoning: Callable[[str], Any] | None = None,
        on_first: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(on_text, on_reasoning, on_first)
        self._by_index: dict[Any, _Slot] = {}
        self._open: _Slot | None = None

    def feed(self, chunk: dict[str, Any]) -> None:
        """Fold one chunk in (the per-token hot path: a handful of dict lookups)."""
        self.chunks += 1
        usage = chunk.get("usage")
        if usage is not None:
            self.usage_obj = usage  # replace, never sum (Gemini sends cumulative usage)
        if self.model is None:
            self.model = chunk.get("model") or None
        choices = chunk.get("choices")
        if not choices:  # usage chunk, Azure prompt filter, DeepInfra, `choices: null`
            return
        # No filtering on `object`: Azure's async-filter events (`object: ""`) carry no
        # delta, and sloppy proxies label real chunks "chat.completion"; structure decides.
        choice = choices[0]
        delta = choice.get("delta")
        if delta:
            content = delta.get("content")
            if content:
                if content.__class__ is not str:
                    raise TypeError(f"delta.content is {type(content).__name__}, not a string")
                self.content_parts.append(content)
                if self.visible_count is None:
                    if not self.started:
                        self._first()
                    self._on_text(content)
            refusal = delta.get("refusal")
            if refusal and refusal.__class__ is str:
                self.content_parts.append(refusal)
                if self.visible_count is None:
                    if not self.started:
                        self._first()
                    self._on_text(refusal)
            # One of the two per delta: vLLM's shim may mirror one into the other.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and reasoning.__class__ is str:
                self._reasoning(reasoning)
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                self._feed_tools(tool_calls)
        finish = choice.get("finish_reason")
        if finish:
            self.finish_reasons.append(finish if finish.__class__ is str else str(finish))

    def _feed_tools(self, deltas: list[Any]) -> None:
        self._tool_seen()
        for tc in deltas:
            index = tc.get("index")
            call_id = tc.get("id")
            if call_id is not None:
                call_id = call_id if isinstance(call_id, str) else str(call_id)
                if not call_id:
                    call_id = None
            function = tc.get("function")
            name = function.get("name") if function else None
            arguments = function.get("arguments") if function else None

            if index is None:
                slot = self._open
                if slot is None or (call_id is not None and slot.id is not None and call_id != slot.id):
                    slot = self._new_slot(None)
            else:
                slot = self._by_index.get(index)
                if slot is None:
                    slot = self._new_slot(index)
                elif call_id is not None and slot.id is not None and call_id != slot.id and name and slot.name:
                    slot = self._new_slot(index)  # Ollama: parallel calls all on index 0
            self._open = slot

            if call_id is not None and slot.id is None:
                slot.id = call_id  # keep the first id (Poolside changes ids mid-call)
            if name:
                slot.name = name
            kind = tc.get("type")
            if kind:
                slot.type = kind
            if arguments is not None:
                if isinstance(arguments, str):
                    if arguments:
                        slot.args.append(arguments)
                else:  # litellm ollama_chat: a whole dict
                    slot.args = [json.dumps(arguments)]
            if not tc.keys() <= _TOOL_DELTA_KEYS:
                for key, value in tc.items():
                    if key not in _TOOL_DELTA_KEYS:
                        slot.extra[key] = value  # e.g. Gemini's extra_content.thought_signature

    def _new_slot(self, index: Any) -> _Slot:
        slot = _Slot(index)
        self.slots.append(slot)
        if index is not None:
            self._by_index[index] = slot
        return slot


_TOOL_DELTA_KEYS = frozenset(("index", "id", "type", "function"))


class ResponsesAccumulator(_Base):
    """Accumulates Responses API stream events (the `json.loads` of each SSE `data:`).

    Complete iff `response.completed` or `response.incomplete` arrived; `response.failed`
    and `error` events raise `StreamBroken("in_band_error")` (the SDK yields them as
    ordinary events, §4.2).
    """

    def __init__(
        self,
        on_text: Callable[[str], Any] | None = None,
        on_reasoning: Callable[[str], Any] | None = None,
        on_first: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(on_text, on_reasoning, on_first)
        self._by_item: dict[Any, _Slot] = {}

    def feed(self, event: dict[str, Any]) -> None:
        self.chunks += 1
        kind = event["type"]
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            delta = event.get("delta")
            if delta:
                if delta.__class__ is not str:
                    raise TypeError(f"{kind} delta is {type(delta).__name__}, not a string")
                self.content_parts.append(delta)
                if self.visible_count is None:
                    if not self.started:
                        self._first()
                    self._on_text(delta)
        elif kind == "response.function_call_arguments.delta":
            delta = event.get("delta")
            slot = self._slot(event.get("item_id"))
            self._tool_seen()
            if delta and isinstance(delta, str):
                slot.args.append(delta)
        elif kind == "response.reasoning_summary_text.delta" or kind == "response.reasoning_text.delta":
            delta = event.get("delta")
            if delta and isinstance(delta, str):
                self._reasoning(delta)
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            item = event.get("item")
            if _get(item, "type") == "function_call":
                slot = self._slot(_get(item, "id") or _get(item, "call_id"))
                self._tool_seen()
                self._fill(slot, item, kind == "response.output_item.done")
        elif kind == "response.function_call_arguments.done":
            arguments = event.get("arguments")
            if isinstance(arguments, str):
                self._slot(event.get("item_id")).args = [arguments]
        elif kind == "response.completed":
            self._terminal(event.get("response"), "stop")
        elif kind == "response.incomplete":
            response = event.get("response")
            details = _get(response, "incomplete_details")
            reason = _get(details, "reason")
            self._terminal(response, "content_filter" if reason == "content_filter" else "length")
        elif kind == "response.created" or kind == "response.in_progress":
            if self.model is None:
                self.model = _get(event.get("response"), "model")
        elif kind == "response.failed":
            error = _get(event.get("response"), "error")
            message = _get(error, "message") or "response.failed"
            raise StreamBroken("in_band_error", f"{_get(error, 'code')}: {message}")
        elif kind == "error":
            raise in_band_error(event)

    def _slot(self, item_id: Any) -> _Slot:
        slot = self._by_item.get(item_id)
        if slot is None:
            slot = _Slot(item_id)
            self.slots.append(slot)
            self._by_item[item_id] = slot
        return slot

    @staticmethod
    def _fill(slot: _Slot, item: Any, done: bool) -> None:
        call_id = _get(item, "call_id")
        if call_id is not None and slot.id is None:
            slot.id = str(call_id)
        name = _get(item, "name")
        if name:
            slot.name = name
        slot.type = "function"
        arguments = _get(item, "arguments")
        if isinstance(arguments, str) and arguments and (done or not slot.args):
            slot.args = [arguments]  # the item's own arguments are authoritative when present

    def _terminal(self, response: Any, reason: str) -> None:
        self.finish_reasons.append(reason)
        usage = _get(response, "usage")
        if usage is not None:
            self.usage_obj = usage
        model = _get(response, "model")
        if model:
            self.model = model


def in_band_error(obj: Any) -> StreamBroken:
    """An error the provider put inside a 200 answer: `{"error": {...}}`, `{"error": "text"}`,
    OpenRouter's error chunk, or a flat Responses `error` event."""
    if not isinstance(obj, dict):
        obj = {"message": str(obj)}  # `event: error` with a bare JSON string or number
    error = obj.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
    elif error:
        code, message = None, str(error)
    else:
        code, message = obj.get("code"), obj.get("message")
    return StreamBroken("in_band_error", f"{code}: {message or 'an error occurred during streaming'}")


# ---------------------------------------------------------------------------
# Non-streaming responses → the same shape


def _error_text(obj: Any) -> str | None:
    error = _get(obj, "error")
    if not error:
        return None
    if isinstance(error, str):
        return error
    return str(_get(error, "message") or error)


def response_from_chat_completion(completion: Any) -> ModelResponse:
    """Convert a `ChatCompletion`; raise `ProviderBadResponse` for a 200 that carries no answer."""
    error = _error_text(completion)
    choices = _get(completion, "choices")
    if error and not choices:
        raise ProviderBadResponse(f"provider returned an error: {error}", provider_message=error)
    if not choices:
        raise ProviderBadResponse("provider returned no choices")
    choice = choices[0]
    message = _get(choice, "message")
    if message is None:
        raise ProviderBadResponse("provider returned a choice without a message")
    content = _get(message, "content") or ""
    if not isinstance(content, str):
        raise ProviderBadResponse("provider returned non-text content")
    refusal = _get(message, "refusal")
    if refusal and not content:
        content = refusal
    reasoning = _get(message, "reasoning_content") or _get(message, "reasoning") or ""
    calls: list[ToolCall] = []
    for position, tc in enumerate(_get(message, "tool_calls") or []):
        function = _get(tc, "function")
        arguments = _get(function, "arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        call_id = _get(tc, "id")
        if isinstance(tc, dict):
            extra = {k: v for k, v in tc.items() if k not in _TOOL_DELTA_KEYS}
        else:
            extra = dict(getattr(tc, "__pydantic_extra__", None) or {})
        calls.append(
            ToolCall(
                id=str(call_id) if call_id not in (None, "") else f"call_{position}",
                name=_get(function, "name") or "",
                arguments=arguments,
                extra=extra,
            )
        )
    finish = _get(choice, "finish_reason")
    return ModelResponse(
        content=content,
        visible_text=content,
        tool_calls=calls,
        reasoning=reasoning if isinstance(reasoning, str) else "",
        finish_reason=final_finish_reason([finish] if finish else [], bool(calls)),
        usage=Usage.from_provider(_get(completion, "usage")),
        model=_get(completion, "model"),
        complete=True,
    )


def response_from_responses(response: Any) -> ModelResponse:
    """Convert a Responses API `Response`; `failed` raises `ProviderBadResponse` with its message."""
    status = _get(response, "status")
    if status == "failed" or (status is None and _get(response, "error")):
        error = _get(response, "error")
        message = str(_get(error, "message") or error or "response failed")
        raise ProviderBadResponse(f"provider returned an error: {message}", code=_get(error, "code"), provider_message=message)
    output = _get(response, "output")
    if output is None:
        raise ProviderBadResponse("provider returned no output")
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    for item in output:
        kind = _get(item, "type")
        if kind == "message":
            for part in _get(item, "content") or []:
                part_type = _get(part, "type")
                if part_type == "output_text":
                    text.append(_get(part, "text") or "")
                elif part_type == "refusal":
                    text.append(_get(part, "refusal") or "")
        elif kind == "function_call":
            calls.append(
                ToolCall(
                    id=str(_get(item, "call_id") or _get(item, "id") or f"call_{len(calls)}"),
                    name=_get(item, "name") or "",
                    arguments=_get(item, "arguments") or "",
                )
            )
        elif kind == "reasoning":
            for part in _get(item, "summary") or []:
                reasoning.append(_get(part, "text") or "")
            for part in _get(item, "content") or []:
                reasoning.append(_get(part, "text") or "")
    if status == "incomplete":
        reason = _get(_get(response, "incomplete_details"), "reason")
        finish = "content_filter" if reason == "content_filter" else "length"
    else:
        finish = "tool_calls" if calls else "stop"
    content = "".join(text)
    return ModelResponse(
        content=content,
        visible_text=content,
        tool_calls=calls,
        reasoning="".join(reasoning),
        finish_reason=finish,
        usage=Usage.from_provider(_get(response, "usage")),
        model=_get(response, "model"),
        complete=True,
    )
