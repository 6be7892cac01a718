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

Reconciliation: a stream's answer must equal the non-streamed answer. Some providers put
part or all of it only in closing events -- Responses text only in `output_text.done`,
`content_part.done`, a message `output_item.done` or the terminal event's `output`, a
function call only in `response.completed`; Chat Completions proxies that send the
message under `choices[0].message` in the last chunk. Those closing objects are read as
the non-streaming path reads them and reconciled with the deltas, part by part:

- deltas win: a part whose closing text equals its deltas, or contradicts them, keeps
  its deltas (a contradiction is logged at DEBUG);
- a part with no deltas gets its closing text; a part whose deltas are a strict prefix
  of its closing text gets the missing tail. It goes where the part belongs (the
  content reads in output order, as the non-streaming path reads it) and is reported
  through `on_text` / `on_reasoning` right then when it extends what was shown last --
  text only before the response's first tool call, as for deltas -- so a live reply
  shows it; a piece that belongs before text already shown reaches the chat with the
  turn's final text;
- each part is reconciled once (the first closing event that names it), so text given
  as deltas and again in `output_text.done`, `content_part.done`, `output_item.done`
  and `response.completed` appears once;
- tool calls are matched by item id or call id (Responses), or by id, else in order by
  name (Chat Completions): a call seen in the stream is completed (missing name, id, or
  an argument tail) and never doubled; a call only in the closing object is added.

The `response_from_*` converters take either shape (the SDK's parsed non-streaming
objects, or the dict of a JSON body that answered a stream request).
"""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

_UNSET: Any = object()  # "no part open": equal to no item id or index a provider sends


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

    __slots__ = ("index", "id", "name", "type", "args", "extra", "closed")

    def __init__(self, index: Any) -> None:
        self.index = index
        self.id: str | None = None
        self.name: str | None = None
        self.type: str | None = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}
        self.closed = False  # its own closing event gave the final arguments

    def reconcile_args(self, final: Any) -> None:
        """The closing object says the arguments are `final`: complete what the deltas gave.

        Deltas win unless they are missing (or are a strict prefix of `final`): the same
        rule as for text.
        """
        if final is None:
            return
        if not isinstance(final, str):
            final = json.dumps(final)  # litellm ollama_chat: a whole dict
        if not final:
            return
        have = "".join(self.args)
        if have == final:
            return
        if final.startswith(have):
            self.args = [final]
        else:
            log.debug("tool call %s: closing arguments differ from the streamed ones; kept the streamed", self.id)

    def to_call(self, position: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{position}",
            name=self.name or "",
            arguments="".join(self.args),
            extra=self.extra,
        )


def _missing(have: str, final: Any, what: str) -> str | None:
    """What a closing `final` text adds to the streamed `have`: all of it, the tail, or None.

    None when `final` is empty or not a string, equals `have`, or contradicts it (deltas
    win; logged at DEBUG).
    """
    if not final or final.__class__ is not str or final == have:
        return None
    if final.startswith(have):
        return final[len(have):]
    log.debug("closing %s differs from the streamed %s (%d vs %d chars); kept the streamed", what, what, len(final), len(have))
    return None


class _Spans:
    """Which part of the final response each accumulated piece belongs to (Responses API).

    The accumulator's piece list (`content_parts` or `reasoning_parts`, shared) is cut
    into consecutive spans, each keyed by the part it streams: (item id, index). A
    closing event names a part and gives its complete text; `close` compares that with
    the part's pieces and puts what is missing where the part ends -- once per part,
    whichever closing event comes first.

    The hot path pays one identity check per delta: a span is opened (from the delta's
    own ids) by the first delta after `reset`, which every structural event calls
    (an item or part added or done). Parts are told apart as long as something
    structural comes between them, which every provider the SDK's own stream helpers
    can read does (they refuse a delta before its `output_item.added`).
    """

    __slots__ = ("pieces", "keys", "starts", "closed", "item", "index")

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.keys: list[tuple[Any, Any]] = []
        self.starts: list[int] = []  # where each span begins in `pieces`; it ends where the next begins
        self.closed: set[tuple[Any, Any]] = set()
        self.item: Any = _UNSET  # the part of the last span
        self.index: Any = _UNSET

    def open(self, item: Any, index: Any) -> None:
        """The pieces appended next belong to part (item, index)."""
        self.item, self.index = item, index
        self.keys.append((item, index))
        self.starts.append(len(self.pieces))

    def reset(self) -> None:
        """A part may have ended: the next delta opens a span of its own."""
        self.item = _UNSET

    def _end(self, span: int) -> int:
        return self.starts[span + 1] if span + 1 < len(self.starts) else len(self.pieces)

    def _claim(self, key: tuple[Any, Any]) -> None:
        """Pieces whose deltas carried no item id: the first part closed with the same index claims them."""
        anonymous = (None, key[1])
        if key[0] is not None and key not in self.keys and anonymous in self.keys:
            span = self.keys.index(anonymous)
            self.keys[span] = key
            if span == len(self.keys) - 1:
                self.item = key[0]

    def close(self, item: Any, index: Any, final: Any, what: str, later: Any = ()) -> tuple[str | None, int]:
        """Part (item, index) is complete with text `final`: add what its pieces lack.

        Returns (the piece added or None, where it went in `pieces`). It goes after the
        part's last span; a part without pieces goes at the end, or before the first
        span of an item in `later` (the ids of the items after it in the output).
        """
        key = (item, index)
        if key in self.closed:
            return None, -1
        self.closed.add(key)
        self._claim(key)
        keys, pieces = self.keys, self.pieces
        spans = [i for i, k in enumerate(keys) if k == key]
        have = "".join(["".join(pieces[self.starts[i] : self._end(i)]) for i in spans])
        missing = _missing(have, final, what)
        if not missing:
            return None, -1
        if spans:
            at = self._end(spans[-1])
        else:
            at = next((self.starts[i] for i, k in enumerate(keys) if k[0] in later), len(pieces))
        if at == len(pieces):
            if key != (self.item, self.index):
                self.open(item, index)
            pieces.append(missing)
            return missing, at
        # In the middle (found after later parts streamed): shift the spans that follow.
        span = max((i for i, start in enumerate(self.starts) if start < at), default=-1)
        if span < 0 or keys[span] != key:
            span += 1
            keys.insert(span, key)
            self.starts.insert(span, at)
        for i in range(span + 1, len(self.starts)):
            self.starts[i] += 1
        pieces.insert(at, missing)
        log.debug("found the rest of a %s part after later parts streamed; not shown until the final text", what)
        return missing, at


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

    def _text(self, text: str) -> None:
        """Text found in a closing object: kept, and shown like a delta (before any tool call)."""
        self.content_parts.append(text)
        if self.visible_count is None:
            if not self.started:
                self._first()
            self._on_text(text)

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
    malformed chunk. A choice's `message` (some proxies' last chunk) is reconciled with
    the deltas (module docstring).
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
            # One of the two per delta: vLLM's shim may mirror one into the other. Before
            # the content: a delta carrying both (a whole message in one chunk) thought first.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and reasoning.__class__ is str:
                self._reasoning(reasoning)
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
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                self._feed_tools(tool_calls)
        finish = choice.get("finish_reason")
        if finish or not delta:
            # Some proxies put the whole message under `message` (not `delta`) in the last chunk.
            message = choice.get("message")
            if message:
                self._close(message)
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

    def _close(self, message: dict[str, Any]) -> None:
        """Reconcile with a complete `message`, read as `response_from_chat_completion` reads one."""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning:
            missing = _missing("".join(self.reasoning_parts), reasoning, "reasoning")
            if missing:
                self._reasoning(missing)
        content = message.get("content") or message.get("refusal")
        if content:
            if content.__class__ is not str:
                raise TypeError(f"message.content is {type(content).__name__}, not a string")
            missing = _missing("".join(self.content_parts), content, "text")
            if missing:
                self._text(missing)
        calls = message.get("tool_calls")
        if calls:
            for tc, slot in zip(calls, self._match(calls)):
                if slot is None:
                    self._tool_seen()
                    slot = self._new_slot(None)
                call_id = tc.get("id")
                if call_id not in (None, "") and slot.id is None:
                    slot.id = str(call_id)
                function = tc.get("function") or {}
                if function.get("name") and not slot.name:
                    slot.name = function["name"]
                slot.type = slot.type or tc.get("type")
                slot.reconcile_args(function.get("arguments"))
                for key, value in tc.items():
                    if key not in _TOOL_DELTA_KEYS:
                        slot.extra.setdefault(key, value)

    def _match(self, calls: list[dict[str, Any]]) -> list[_Slot | None]:
        """The streamed call each of a message's tool calls is: the one with its id, else
        the first one left with its name (ids may change mid-call); None: not streamed."""
        by_id = {slot.id: slot for slot in reversed(self.slots) if slot.id is not None}
        matched: list[_Slot | None] = []
        for tc in calls:
            call_id = tc.get("id")
            matched.append(by_id.pop(str(call_id), None) if call_id not in (None, "") else None)
        left = [slot for slot in self.slots if all(slot is not m for m in matched)]
        for position, tc in enumerate(calls):
            if matched[position] is None and left:
                name = (tc.get("function") or {}).get("name")
                slot = next((s for s in left if not s.name or not name or s.name == name), None)
                if slot is not None:
                    left.remove(slot)
                    matched[position] = slot
        return matched


_TOOL_DELTA_KEYS = frozenset(("index", "id", "type", "function"))


class ResponsesAccumulator(_Base):
    """Accumulates Responses API stream events (the `json.loads` of each SSE `data:`).

    Complete iff `response.completed` or `response.incomplete` arrived; `response.failed`
    and `error` events raise `StreamBroken("in_band_error")` (the SDK yields them as
    ordinary events, §4.2). Closing events are reconciled with the deltas (module
    docstring): text and reasoning parts are keyed by (item id, index) -- a reasoning
    summary part by its `summary_index`, a reasoning content part by `~content_index`.
    """

    def __init__(
        self,
        on_text: Callable[[str], Any] | None = None,
        on_reasoning: Callable[[str], Any] | None = None,
        on_first: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(on_text, on_reasoning, on_first)
        self._by_item: dict[Any, _Slot] = {}
        self._text_spans = _Spans(self.content_parts)
        self._reasoning_spans = _Spans(self.reasoning_parts)

    def feed(self, event: dict[str, Any]) -> None:
        self.chunks += 1
        kind = event["type"]
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            delta = event.get("delta")
            if delta:
                if delta.__class__ is not str:
                    raise TypeError(f"{kind} delta is {type(delta).__name__}, not a string")
                spans = self._text_spans
                if spans.item is _UNSET:
                    spans.open(event.get("item_id"), event.get("content_index") or 0)
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
                spans = self._reasoning_spans
                if spans.item is _UNSET:
                    if kind == "response.reasoning_summary_text.delta":
                        spans.open(event.get("item_id"), event.get("summary_index") or 0)
                    else:
                        spans.open(event.get("item_id"), ~(event.get("content_index") or 0))
                self._reasoning(delta)
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            self._text_spans.reset()
            self._reasoning_spans.reset()
            item = event.get("item")
            item_type = _get(item, "type")
            if item_type == "function_call":
                slot = self._slot(_get(item, "id") or _get(item, "call_id"))
                self._tool_seen()
                done = kind == "response.output_item.done"
                self._fill(slot, item, done)
                slot.closed = slot.closed or done
            elif kind == "response.output_item.done":
                self._close_item(item, item_type)
        elif kind == "response.function_call_arguments.done":
            arguments = event.get("arguments")
            if isinstance(arguments, str):
                slot = self._slot(event.get("item_id"))
                slot.args = [arguments]
                slot.closed = True
        elif kind == "response.output_text.done" or kind == "response.refusal.done":
            self._text_spans.reset()
            final = event.get("text") if kind == "response.output_text.done" else event.get("refusal")
            self._close_text(event.get("item_id"), event.get("content_index") or 0, final)
        elif kind == "response.content_part.done" or kind == "response.content_part.added":
            self._text_spans.reset()
            self._reasoning_spans.reset()  # reasoning_text parts come as content parts too
            if kind == "response.content_part.done":
                self._close_text(event.get("item_id"), event.get("content_index") or 0, _part_text(event.get("part")))
        elif kind == "response.reasoning_summary_text.done" or kind == "response.reasoning_summary_part.done":
            self._reasoning_spans.reset()
            final = event.get("text") if kind == "response.reasoning_summary_text.done" else _get(event.get("part"), "text")
            self._close_reasoning(event.get("item_id"), event.get("summary_index") or 0, final)
        elif kind == "response.reasoning_summary_part.added" or kind == "response.reasoning_text.done":
            self._reasoning_spans.reset()
            if kind == "response.reasoning_text.done":
                self._close_reasoning(event.get("item_id"), ~(event.get("content_index") or 0), event.get("text"))
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

    def _close_text(self, item: Any, index: Any, final: Any, later: Any = ()) -> None:
        missing, at = self._text_spans.close(item, index, final, "text", later)
        if missing is None:
            return
        if not self.started:
            self._first()
        if at == len(self.content_parts) - 1:
            if self.visible_count is None:
                self._on_text(missing)  # shown like a delta: only before the first tool call
        elif self.visible_count is not None and at < self.visible_count:
            self.visible_count += 1  # inside the text shown before the tool calls

    def _close_reasoning(self, item: Any, index: Any, final: Any, later: Any = ()) -> None:
        missing, at = self._reasoning_spans.close(item, index, final, "reasoning", later)
        if missing is None:
            return
        if not self.started:
            self._first()
        if at == len(self.reasoning_parts) - 1:
            self._on_reasoning(missing)

    def _close_item(self, item: Any, item_type: Any, later: Any = ()) -> None:
        """A finished output item (from `output_item.done` or the terminal `output`), as
        `response_from_responses` reads it; `later`: the ids of the items after it."""
        item_id = _get(item, "id")
        if item_type == "message":
            for index, part in enumerate(_get(item, "content") or ()):
                self._close_text(item_id, index, _part_text(part), later)
        elif item_type == "reasoning":
            for index, part in enumerate(_get(item, "summary") or ()):
                self._close_reasoning(item_id, index, _get(part, "text"), later)
            for index, part in enumerate(_get(item, "content") or ()):
                self._close_reasoning(item_id, ~index, _get(part, "text"), later)
        elif item_type == "function_call":
            self._close_call(item)

    def _close_call(self, item: Any) -> None:
        """A function call in the terminal `output`: complete the streamed one, or add it."""
        item_id, call_id = _get(item, "id"), _get(item, "call_id")
        slot = self._by_item.get(item_id) if item_id is not None else None
        if slot is None and call_id is not None:
            slot = self._by_item.get(call_id) or next((s for s in self.slots if s.id == str(call_id)), None)
        if slot is None:
            slot = self._slot(item_id if item_id is not None else call_id)
            self._tool_seen()
        self._fill(slot, item, False)
        if not slot.closed:
            slot.reconcile_args(_get(item, "arguments"))
            slot.closed = True

    def _terminal(self, response: Any, reason: str) -> None:
        output = _get(response, "output") or ()
        ids = [_get(item, "id") for item in output]
        for position, item in enumerate(output):
            self._close_item(item, _get(item, "type"), frozenset(ids[position + 1 :]) - {None})
        self.finish_reasons.append(reason)
        usage = _get(response, "usage")
        if usage is not None:
            self.usage_obj = usage
        model = _get(response, "model")
        if model:
            self.model = model


def _part_text(part: Any) -> Any:
    """The text of a message content part: `output_text` text or a `refusal`; None for others."""
    kind = _get(part, "type")
    if kind == "output_text":
        return _get(part, "text")
    if kind == "refusal":
        return _get(part, "refusal")
    return None


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
