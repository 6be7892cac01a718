"""A fake OpenAI-compatible provider: aiohttp, real SSE over 127.0.0.1.

Serves `POST /v1/chat/completions`, `POST /v1/responses` and `GET /v1/models` the way
real providers do — including the ways they break. Tests drive it through the real
`openai` SDK (`fake.base_url`, `fake.api_key`); a wrong key gets OpenAI's 401.

What a request gets is chosen by its model name:

- `fault:<mode>[+<mode>...][;key=value,...]` — a fault mode from `CHAT_FAULTS` /
  `RESPONSES_FAULTS` (reference `llm-streaming.md` §4.2 and §6), combinable with `+`
  (one framing fault, one payload quirk, one timing fault, one `nonstream_*` fault).
  Parameters tune timings: `stall`, `drip`, `keepalive`, `keepalive_every`, `late`,
  `interval` (seconds). Stream faults hit streaming requests only; `nonstream_*`
  faults hit non-streaming requests only; `429` and `first_byte_late` hit both.
  Unknown modes → HTTP 400.
- `bench:tokens=600,rate=30,ttft=0.2,chunk=1,seed=7[,tick=0.05]` — a deterministic reply
  of `bench_text(tokens, seed)` streamed at `rate` tokens/s (`rate=0`: as fast as the
  socket takes it), for benchmarks running the fake in another process.
- anything else — the next scripted `Reply` (`fake.script(...)`), or when the script is
  empty a deterministic default ("You said: <last user message>", or a summary of the
  tool results when the last message is one).

Script bookkeeping, exact: each request pops the next entry when it arrives (so
concurrent requests get distinct replies). The entry goes back to the head of the queue
when the reply could not be delivered: a stream fault struck (it strikes once per
entry), or the client went away mid-stream (watchdog timeout, interrupt). Such an entry
waits for the step's fallback — the next *non-streaming* request gets it, complete; the
next *streaming* request instead drops it (an interrupted turn never falls back) and
takes the entry after it. A `nonstream_*` fault keeps its entry waiting (a provider that
stays down); a `429` puts its entry back for the SDK's retry of the same request.

`GET /v1/models` lists `fake.listed_models` (default `fake-model` and `other-model`, the
models tests configure); set it to other names to play a provider that does not serve a
configured model, or to None to play one without a `/models` endpoint (404, as many local
servers answer). Chat requests are answered whatever the model, as before.

Images: user messages may carry image parts (Chat Completions `image_url`, Responses
`input_image`); each request records their URLs (`record.images`, and `record.image_bytes()`
decodes the `data:` ones). A `data:` URL must hold base64 of a PNG, JPEG, GIF or WEBP, else
OpenAI's 400 "You uploaded an unsupported image". A model in `fake.blind_models` cannot see:
any request with an image gets OpenAI's 400 "Invalid content type. image_url is only
supported by certain models." (streaming or not).

Transcription: `POST /v1/audio/transcriptions` (multipart `model`, `file`, optional
`response_format`) answers the next `fake.script_transcripts(...)` entry -- a text, or a
`TranscriptionFault(status)` -- else "(transcript of N bytes)". An empty file gets 400
`audio_too_short`, a file name without a Whisper format extension 400 "Invalid file format".
Each one is recorded in `fake.transcriptions` (`TranscriptionRecord`, with the bytes).

Every request is recorded (`fake.requests`, `GET /_fake/requests`, `POST /_fake/reset`),
with the read timeout the SDK announced (`x-stainless-read-timeout`) and how many other
requests to the same path were still being answered when it arrived (`concurrent`;
`fake.max_in_flight` per path) -- a retry that overlaps the attempt it repeats shows there.
Run standalone: `python -m tests.fakes.llm --port 8083` (`--list-models a,b`,
`--no-models-endpoint`).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import itertools
import json
import random
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "API_KEY",
    "CHAT_FAULTS",
    "DEFAULT_MODEL",
    "OTHER_MODEL",
    "FAULT_TEXT",
    "FAULT_TOOL_CALLS",
    "RESPONSES_FAULTS",
    "FakeLLM",
    "RequestRecord",
    "Reply",
    "TranscriptionFault",
    "TranscriptionRecord",
    "bench_text",
    "image_urls",
]

API_KEY = "sk-parley-fake-key-0123456789abcdef"
DEFAULT_MODEL = "fake-model"
OTHER_MODEL = "other-model"  # the second model tests configure (`provider.models`)
FAULT_TEXT = "Hello from the fake provider. This reply streams in several small chunks."
FAULT_TOOL_CALLS: list[tuple[str, dict[str, Any]]] = [("get_weather", {"city": "Paris"}), ("get_time", {})]
FAULT_REASONING = "First I think about it, then I answer."

# ---------------------------------------------------------------------------
# Fault catalogue. Every mode listed here must be handled below, and every mode has an
# expected turn outcome in tests/test_agent_faults.py (a new mode without one fails).

_SHARED_FAULTS: dict[str, str] = {
    "normal": "a well-formed stream",
    "crlf": "CRLF line endings",
    "byte_by_byte": "every byte in its own write",
    "multi_data_lines": "JSON split over several data: lines",
    "text_plain": "Content-Type: text/plain",
    "comment_keepalive": "': OPENROUTER PROCESSING' comments between events",
    "comment_after_id": "events carry id:, then a ': ping' comment → an empty-data event (SDK: JSONDecodeError)",
    "retry_directive": "'retry: 3000' mid-stream → an empty-data event (SDK: JSONDecodeError)",
    "event_ping_nodata": "'event: ping' without data (SDK: JSONDecodeError)",
    "data_comment": "'data: : OPENROUTER PROCESSING' (comment re-wrapped as data; SDK: JSONDecodeError)",
    "junk_data": "a data: line that is not JSON mid-stream (a proxy's HTML error page)",
    "200_error_json": "HTTP 200 application/json error body to a stream request (SDK: 0 chunks)",
    "ignore_stream": "HTTP 200 application/json full response to a stream request (SDK: 0 chunks)",
    "last_event_unterminated": "the final events lack the blank line before EOF (dropped)",
    "abort_midstream": "two content events, then the TCP connection is closed mid-body",
    "stall": "one content event, then silence for `stall` seconds (default 30)",
    "slow_drip": "`drip` seconds (default 0.05) between every event",
    "keepalive_only": "only comments for `keepalive` seconds (default 0.3), then the reply",
    "headers_late": "`late` seconds (default 0.3) before the response headers",
    "first_byte_late": "`late` seconds before the response headers, streaming or not (a slow or hung provider)",
    "slow_cancel": "50 content events, `interval` seconds apart (default 0.2)",
    "429": "HTTP 429 rate_limit_exceeded (retry-after-ms: 1), streaming or not",
    "reject_stream": "HTTP 400 \"Unsupported value: 'stream' does not support true\" to stream requests",
    "reasoning": "reasoning deltas before the answer",
    "tool_std": "two parallel tool calls, OpenAI shape",
    "nonstream_500": "non-streaming requests get HTTP 500",
    "nonstream_400": "non-streaming requests get HTTP 400 (context length)",
    "nonstream_429": "non-streaming requests get HTTP 429",
    "nonstream_200_error": "non-streaming requests get HTTP 200 carrying an error instead of an answer",
}

CHAT_FAULTS: dict[str, str] = {
    **_SHARED_FAULTS,
    "done_nospace": "'data:[DONE]' without the space",
    "trailing_after_done": "junk events after [DONE]",
    "midstream_error": "content, then data: {error: {code: overloaded}}",
    "midstream_error_event": "content, then 'event: error' + {error: {code: 500}}",
    "midstream_error_string": "content, then data: {error: 'Internal server error'}",
    "connection_lost_error": "content, then an in-band 'Network connection lost.' error (OpenRouter/Anthropic)",
    "openrouter_error_chunk": "content, then OpenRouter's error chunk with finish_reason 'error'",
    "llamacpp_error_field": "an 'error:' SSE field then [DONE] (0 chunks)",
    "eof_no_done": "two content chunks, then a clean EOF without finish_reason or [DONE]",
    "reject_stream_403": "HTTP 403 'Streaming requests are not yet allowed.' (Azure)",
    "reject_stream_options": "HTTP 400 'Unrecognized request argument supplied: stream_options'",
    "reject_stream_options_422": "HTTP 422 on stream_options (Mistral)",
    "reject_stream_options_500": "HTTP 500 'extraneous key [include_usage] is not permitted' (Bedrock)",
    "null_choices": "a chunk with choices: null mid-stream",
    "empty_choices_mid": "a chunk with choices: [] mid-stream",
    "azure_filter": "a prompt-filter chunk with choices: [] first",
    "role_every_chunk": "role repeated in every delta",
    "usage_every_chunk": "cumulative usage on every chunk (Gemini)",
    "empty_finish_reason": "finish_reason '' on intermediate chunks (sglang)",
    "reasoning_openrouter": "reasoning in delta.reasoning (OpenRouter, vLLM >= 0.16)",
    "reasoning_mirrored": "the same reasoning in reasoning_content and reasoning (vLLM shim)",
    "think_in_content": "<think>...</think> inside content",
    "tool_all_at_once": "each tool call whole in one delta",
    "stop_with_tools": "tool calls, then finish_reason 'stop'",
    "double_finish": "finish_reason 'tool_calls' then 'stop'",
    "tool_repeat_id_name": "id, type and name repeated in every tool delta",
    "tool_no_index": "tool deltas without index (Gemini)",
    "tool_ollama_index0": "parallel calls all on index 0, told apart by id (Ollama)",
    "tool_int_id": "integer tool call ids (Poolside)",
    "tool_args_dict": "function.arguments as a JSON object, not a string (litellm)",
    "hermes_xml": "a <tool_call> written as content text",
    # The answer in closing objects (agent/stream.py reconciles them with the deltas):
    "whole_message_chunk": "the whole answer (role, content, reasoning, tool calls with full arguments) in one "
                           "delta, with finish_reason",
    "message_only_chunk": "no deltas: one chunk with the whole message under choices[0].message, with finish_reason",
    "message_in_last_chunk": "deltas short of the last text piece, then a last chunk with the whole message under "
                             "choices[0].message (no delta) and finish_reason (proxies)",
    "tool_calls_in_last_chunk": "text deltas, then every tool call whole (id, name, arguments) in the finish chunk",
}

RESPONSES_FAULTS: dict[str, str] = {
    **_SHARED_FAULTS,
    "failed": "content, then response.failed",
    "incomplete": "two text deltas, then response.incomplete (max_output_tokens)",
    "error_event": "content, then a flat error event",
    "error_event_nested": "content, then {type: error, error: {...}} (SDK raises APIError)",
    "eof": "all content, then EOF without a terminal event",
    "no_created": "no response.created / in_progress",
    "done_marker": "a 'data: [DONE]' after the terminal event",
    "seq_dup": "duplicate and out-of-order sequence numbers",
    "delta_before_item": "output_text.delta before its output_item.added",
    # The answer in closing events only (agent/stream.py reconciles them with the deltas):
    "text_in_done": "no text deltas; the text only in response.output_text.done",
    "text_in_part_done": "no text deltas; the text only in response.content_part.done",
    "text_in_item_done": "no text deltas; the text only in the message's response.output_item.done",
    "text_in_completed": "no text deltas; the text only in response.completed's output",
    "text_tail_in_done": "each message's last text delta missing; the closing events have the whole text",
    "text_done_differs": "the closing events carry a text that contradicts the deltas (the deltas count)",
    "call_in_completed": "function calls only in response.completed's output (no output_item or argument events)",
    "call_tail_in_completed": "function calls announced with argument deltas short of the last piece, no "
                              "arguments.done / output_item.done; only response.completed has them whole",
    "reasoning_in_done": "no reasoning deltas; the reasoning only in response.reasoning_summary_text.done",
    "reasoning_in_completed": "no reasoning deltas; the reasoning only in response.completed's output",
}

_NONSTREAM_FAULTS = {"nonstream_500", "nonstream_400", "nonstream_429", "nonstream_200_error"}
_BOTH_FAULTS = {"429"}
_TOOL_MODES = {
    "tool_std",
    "tool_all_at_once",
    "stop_with_tools",
    "double_finish",
    "tool_repeat_id_name",
    "tool_no_index",
    "tool_ollama_index0",
    "tool_int_id",
    "tool_args_dict",
    "tool_calls_in_last_chunk",
    "call_in_completed",
    "call_tail_in_completed",
}
_REASONING_MODES = {"reasoning", "reasoning_openrouter", "reasoning_mirrored", "reasoning_in_done", "reasoning_in_completed"}
# Responses closing-only modes: the one event that carries the text / the reasoning.
_TEXT_CARRIERS = {
    "text_in_done": "response.output_text.done",
    "text_in_part_done": "response.content_part.done",
    "text_in_item_done": "response.output_item.done",
    "text_in_completed": "response.completed",
}
_REASONING_CARRIERS = {
    "reasoning_in_done": "response.reasoning_summary_text.done",
    "reasoning_in_completed": "response.completed",
}
_COMPLETED_CARRIES = {"text_in_completed", "reasoning_in_completed", "call_in_completed", "call_tail_in_completed"}
_PARAM_DEFAULTS: dict[str, float] = {
    "stall": 30.0,
    "drip": 0.05,
    "keepalive": 0.3,
    "keepalive_every": 0.05,
    "late": 0.3,
    "interval": 0.2,
}

# ---------------------------------------------------------------------------
# Deterministic benchmark text

_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud maple harbor "
    "lantern meadow copper silver window garden pepper candle orbit signal forest rocket velvet summit "
    "marble falcon prairie beacon canyon willow ember glacier thunder violet saddle cobalt tundra"
).split()


def bench_text(tokens: int, seed: int = 0) -> str:
    """The exact text a `bench:` reply streams: `tokens` plain words joined by spaces."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))


def _bench_chunks(tokens: int, seed: int, per_chunk: int) -> list[str]:
    words = bench_text(tokens, seed).split(" ") if tokens else []
    per_chunk = max(1, per_chunk)
    chunks = []
    for start in range(0, len(words), per_chunk):
        piece = " ".join(words[start : start + per_chunk])
        chunks.append(piece if start == 0 else " " + piece)
    return chunks


# ---------------------------------------------------------------------------
# Replies


@dataclass(slots=True)
class ToolSpec:
    name: str
    arguments: str  # the JSON string the model "writes" (may be deliberately invalid)
    id: str | None = None


@dataclass(slots=True)
class Reply:
    """One scripted model answer. Build with `Reply.text(...)` or `Reply.tool_calls(...)`."""

    content: str = ""  # text before any tool call (the whole answer for a text reply)
    calls: list[ToolSpec] = field(default_factory=list)
    text_after: str = ""  # text streamed after the tool-call deltas (suppressed by the agent)
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"
    chunk: int = 5  # characters per streamed piece
    delay: float = 0.0  # seconds between content events
    ttft: float = 0.0  # seconds before the first content event
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    fault: str | None = None
    hold: asyncio.Event | None = None
    hold_at: int = 0  # content events sent before waiting on `hold`
    pieces: list[str] | None = None  # explicit text pieces (bench); overrides `chunk`

    @classmethod
    def text(
        cls,
        text: str,
        *,
        chunk: int = 5,
        delay: float = 0.0,
        ttft: float = 0.0,
        reasoning: str | None = None,
        reasoning_field: str = "reasoning_content",
        usage: dict[str, int] | None = None,
        finish_reason: str | None = None,
        fault: str | None = None,
        hold: asyncio.Event | None = None,
        hold_at: int = 0,
    ) -> Reply:
        return cls(
            content=text,
            chunk=chunk,
            delay=delay,
            ttft=ttft,
            reasoning=reasoning,
            reasoning_field=reasoning_field,
            usage=usage,
            finish_reason=finish_reason,
            fault=fault,
            hold=hold,
            hold_at=hold_at,
        )

    @classmethod
    def tool_calls(
        cls,
        calls: Iterable[tuple[str, Any] | tuple[str, Any, str]],
        *,
        text_before: str = "",
        text_after: str = "",
        chunk: int = 5,
        delay: float = 0.0,
        ttft: float = 0.0,
        reasoning: str | None = None,
        usage: dict[str, int] | None = None,
        finish_reason: str | None = None,
        fault: str | None = None,
        hold: asyncio.Event | None = None,
        hold_at: int = 0,
    ) -> Reply:
        """`calls`: (name, arguments[, id]); a dict is JSON-encoded, a str is sent verbatim."""
        specs = []
        for item in calls:
            name, arguments = item[0], item[1]
            call_id = item[2] if len(item) > 2 else None  # type: ignore[misc]
            args = arguments if isinstance(arguments, str) else json.dumps(arguments)
            specs.append(ToolSpec(name, args, call_id))
        return cls(
            content=text_before,
            calls=specs,
            text_after=text_after,
            chunk=chunk,
            delay=delay,
            ttft=ttft,
            reasoning=reasoning,
            usage=usage,
            finish_reason=finish_reason,
            fault=fault,
            hold=hold,
            hold_at=hold_at,
        )

    def text_pieces(self, text: str) -> list[str]:
        size = max(1, self.chunk)
        return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass(slots=True)
class _Entry:
    reply: Reply
    stream_fault_used: bool = False  # a stream fault strikes once per entry
    status_fault_used: bool = False  # so does a 429
    awaiting_fallback: bool = False  # put back for the fallback request of a broken stream


@dataclass(slots=True)
class _Plan:
    reply: Reply
    modes: set[str]
    params: dict[str, float]
    source: str  # "script", "default", "fault", "bench"
    bench: dict[str, float] | None = None
    entry: _Entry | None = None  # the script entry served (None for fault/bench/default)
    put_back: bool = False


@dataclass
class RequestRecord:
    """What the fake saw and did for one request (times are `time.monotonic()`)."""

    id: int
    api: str  # "chat" | "responses" | "models"
    model: str | None
    stream: bool
    stream_options: bool
    messages: list[Any]
    tools: list[Any] | None
    body: dict[str, Any]
    source: str = ""
    faults: list[str] = field(default_factory=list)
    status: int = 200
    t_received: float = 0.0
    t_first_token_sent: float | None = None
    t_done: float | None = None
    chunks_sent: int = 0
    disconnected: bool = False
    sdk_retry: int = 0  # the SDK's x-stainless-retry-count: >0 repeats the previous request
    read_timeout: float | None = None  # the SDK's x-stainless-read-timeout (seconds)
    path: str = ""
    concurrent: int = 0  # other requests to the same path still being answered when this one arrived
    images: list[str] = field(default_factory=list)  # image URLs in the messages, in order

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if brief:
            for key in ("messages", "tools", "body", "images"):
                data.pop(key)
        return data

    def image_bytes(self) -> list[bytes]:
        """The bytes of every `data:` image URL in the request, in order."""
        return [decoded for url in self.images if (decoded := _data_url_bytes(url)) is not None]


def image_urls(messages: list[Any]) -> list[str]:
    """Image URLs in Chat Completions (`image_url`) or Responses (`input_image`) messages."""
    urls: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                urls.append(str(url))
            elif part.get("type") == "input_image":
                urls.append(str(part.get("image_url")))
    return urls


def _data_url_bytes(url: str) -> bytes | None:
    """The bytes of a `data:<mime>;base64,...` URL; None when it is not one or does not decode."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        return None
    try:
        return binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def _is_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@dataclass(slots=True)
class TranscriptionFault:
    """A scripted transcription failure: `status` with an OpenAI-shaped error body.

    `hold`: answer only once it is set (never set: a transcription that never ends).
    """

    status: int = 500
    message: str = "The server had an error while processing your request."
    hold: asyncio.Event | None = None


@dataclass
class TranscriptionRecord:
    """One `POST /v1/audio/transcriptions` as the fake saw it."""

    model: str | None
    filename: str | None
    content_type: str | None
    data: bytes
    fields: dict[str, str]
    status: int = 200
    text: str | None = None
    t_received: float = 0.0


def _parse_kv(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = float(value)
    return out


def _parse_fault(spec: str) -> tuple[set[str], dict[str, float]]:
    modes_part, _, params_part = spec.partition(";")
    modes = {m.strip() for m in modes_part.split("+") if m.strip()}
    params = dict(_PARAM_DEFAULTS)
    params.update(_parse_kv(params_part))
    return modes, params


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p["text"]) for p in content if isinstance(p, dict) and "text" in p)
            return str(content or "")
    return ""


def _tool_outputs(messages: list[Any]) -> list[str] | None:
    """The tool results at the end of the conversation, or None if it does not end with them."""
    outputs: list[str] = []
    for message in reversed(messages):
        if not isinstance(message, dict):
            break
        if message.get("role") == "tool":
            outputs.append(str(message.get("content", "")))
        elif message.get("type") == "function_call_output":
            outputs.append(str(message.get("output", "")))
        else:
            break
    return list(reversed(outputs)) if outputs else None


IMAGE_PROMPT_TOKENS = 765
"""What OpenAI bills for one 1024x1024 image at high detail: the fake's usage for an image part."""


def _word_count(messages: list[Any]) -> int:
    """Prompt tokens the fake reports: JSON characters / 20, an image part as a fixed count."""
    images = image_urls(messages)
    chars = len(json.dumps(messages)) - sum(map(len, images))
    return max(1, chars // 20) + IMAGE_PROMPT_TOKENS * len(images)


# ---------------------------------------------------------------------------
# Frames: one SSE event each


@dataclass(slots=True)
class _Frame:
    data: str
    event: str | None = None
    content: bool = False  # content-bearing: text, reasoning or tool-call delta
    final: bool = False  # the finish chunk / terminal event (and what follows)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _Ids:
    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self, prefix: str) -> str:
        return f"{prefix}{next(self._counter)}"


def _usage_numbers(reply: Reply, plan_messages: list[Any], completion: int, reasoning: int) -> dict[str, int]:
    if reply.usage is not None:
        usage = dict(reply.usage)
        usage.setdefault("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        return usage
    prompt = _word_count(plan_messages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion + reasoning,
        "total_tokens": prompt + completion + reasoning,
        "reasoning_tokens": reasoning,
    }


def _chat_usage(u: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": u.get("prompt_tokens", 0),
        "completion_tokens": u.get("completion_tokens", 0),
        "total_tokens": u.get("total_tokens", 0),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
    }


def _responses_usage(u: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": u.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
        "total_tokens": u.get("total_tokens", 0),
    }


def _reply_for_modes(modes: set[str], messages: list[Any]) -> Reply:
    """The reply a `fault:` model serves (deterministic, so tests can assert on it)."""
    outputs = _tool_outputs(messages)
    if modes & _TOOL_MODES:
        if outputs is not None:
            return Reply.text("Done: " + "; ".join(outputs), chunk=8)
        return Reply.tool_calls(FAULT_TOOL_CALLS, chunk=6)
    if "hermes_xml" in modes:
        return Reply.text('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', chunk=12)
    if "slow_cancel" in modes:
        return Reply(pieces=[f"part{i} " for i in range(50)])
    reply = Reply.text(FAULT_TEXT, chunk=8)
    if modes & _REASONING_MODES:
        reply.reasoning = FAULT_REASONING
        if "reasoning_openrouter" in modes:
            reply.reasoning_field = "reasoning"
        elif "reasoning_mirrored" in modes:
            reply.reasoning_field = "both"
    if "think_in_content" in modes:
        reply.content = "<think>plan</think>" + FAULT_TEXT
    return reply


def _full_text(reply: Reply) -> str:
    text = "".join(reply.pieces) if reply.pieces is not None else reply.content
    return text + reply.text_after


class _Builder:
    """Builds the wire payloads for one reply (stream frames and the non-streaming body)."""

    def __init__(self, reply: Reply, modes: set[str], model: str, messages: list[Any], ids: _Ids) -> None:
        self.reply = reply
        self.modes = modes
        self.model = model
        self.messages = messages
        self.created = int(time.time())
        self.cid = ids.next("chatcmpl-fake")
        self.rid = ids.next("resp_fake")
        self.call_ids = [spec.id or ids.next("call_") for spec in reply.calls]
        if "tool_int_id" in modes:
            self.call_ids = [str(7 + i) for i in range(len(reply.calls))]
        self.pieces = reply.pieces if reply.pieces is not None else reply.text_pieces(reply.content)
        self.after_pieces = reply.text_pieces(reply.text_after) if reply.text_after else []
        self.reasoning_pieces = reply.text_pieces(reply.reasoning) if reply.reasoning else []
        arg_pieces = sum(len(reply.text_pieces(spec.arguments)) for spec in reply.calls)
        self.usage = _usage_numbers(
            reply, messages, len(self.pieces) + len(self.after_pieces) + arg_pieces, len(self.reasoning_pieces)
        )
        self.finish = reply.finish_reason or ("tool_calls" if reply.calls else "stop")
        self.text_carrier = next((event for mode, event in _TEXT_CARRIERS.items() if mode in modes), None)
        self.reasoning_carrier = next((event for mode, event in _REASONING_CARRIERS.items() if mode in modes), None)

    # -- chat completions ----------------------------------------------------

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if "role_every_chunk" in self.modes:
            delta = {"role": "assistant", **delta}
        if finish is None and "empty_finish_reason" in self.modes:
            finish = ""  # type: ignore[assignment]
        return {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    def _message_chunk(self, finish: str) -> dict[str, Any]:
        """A chunk carrying the whole message under `message` instead of `delta` (proxies)."""
        chunk = self._chunk({}, finish)
        choice = chunk["choices"][0]
        del choice["delta"]
        choice["message"] = self._chat_message()
        return chunk

    def chat_frames(self, include_usage: bool) -> list[_Frame]:
        modes, reply = self.modes, self.reply
        frames: list[_Frame] = []
        if "azure_filter" in modes:
            frames.append(
                _Frame(_dumps({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}))
            )
        finish = "stop" if "stop_with_tools" in modes else self.finish
        if "whole_message_chunk" in modes:
            message = self._chat_message()
            delta: dict[str, Any] = {"role": "assistant", "content": message["content"]}
            delta.update((k, v) for k, v in message.items() if k in ("reasoning_content", "reasoning"))
            if reply.calls:
                delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
            frames.append(_Frame(_dumps(self._chunk(delta, finish)), content=True, final=True))
        elif "message_only_chunk" in modes:
            frames.append(_Frame(_dumps(self._message_chunk(finish)), content=True, final=True))
        else:
            frames.append(_Frame(_dumps(self._chunk({"role": "assistant", "content": ""}))))
            for piece in self.reasoning_pieces:
                if reply.reasoning_field == "both":
                    delta = {"reasoning_content": piece, "reasoning": piece}
                else:
                    delta = {reply.reasoning_field: piece}
                frames.append(_Frame(_dumps(self._chunk(delta)), content=True))
            # message_in_last_chunk: the last text piece comes only in the message
            short = "message_in_last_chunk" in modes
            pieces = self.pieces[:-1] if short and not self.after_pieces else self.pieces
            after = self.after_pieces[:-1] if short else self.after_pieces
            for piece in pieces:
                frames.append(_Frame(_dumps(self._chunk({"content": piece})), content=True))
            if "tool_calls_in_last_chunk" not in modes:
                frames.extend(self._chat_tool_frames())
            for piece in after:
                frames.append(_Frame(_dumps(self._chunk({"content": piece})), content=True))
            if "message_in_last_chunk" in modes:
                frames.append(_Frame(_dumps(self._message_chunk(finish)), content=True, final=True))
            elif "tool_calls_in_last_chunk" in modes and reply.calls:
                calls = [dict(call, index=i) for i, call in enumerate(self._chat_message()["tool_calls"])]
                frames.append(_Frame(_dumps(self._chunk({"tool_calls": calls}, finish)), content=True, final=True))
            else:
                frames.append(_Frame(_dumps(self._chunk({}, finish)), final=True))
        if "double_finish" in modes:
            frames.append(_Frame(_dumps(self._chunk({}, "stop")), final=True))
        if include_usage or "usage_every_chunk" in modes:
            frames.append(
                _Frame(
                    _dumps({"id": self.cid, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": _chat_usage(self.usage)}),
                    final=True,
                )
            )
        if "usage_every_chunk" in modes:
            frames = self._with_cumulative_usage(frames)
        for mode, payload in (("null_choices", None), ("empty_choices_mid", [])):
            if mode in modes:
                position = next((i for i, f in enumerate(frames) if f.content), len(frames) - 1) + 1
                frames.insert(position, _Frame(_dumps({"id": self.cid, "object": "chat.completion.chunk",
                                                       "created": self.created, "model": self.model,
                                                       "choices": payload})))
        return frames

    def _with_cumulative_usage(self, frames: list[_Frame]) -> list[_Frame]:
        out = []
        produced = 0
        for frame in frames:
            obj = json.loads(frame.data)
            if obj.get("choices"):
                produced += 1
                partial = dict(self.usage)
                partial["completion_tokens"] = min(produced, self.usage["completion_tokens"])
                partial["total_tokens"] = partial["prompt_tokens"] + partial["completion_tokens"]
                obj["usage"] = _chat_usage(partial)
            out.append(_Frame(_dumps(obj), frame.event, frame.content, frame.final))
        return out

    def _chat_tool_frames(self) -> list[_Frame]:
        modes, reply = self.modes, self.reply
        frames: list[_Frame] = []
        for i, spec in enumerate(reply.calls):
            call_id: Any = int(self.call_ids[i]) if "tool_int_id" in modes else self.call_ids[i]
            index = 0 if "tool_ollama_index0" in modes else i
            head = {"index": index, "id": call_id, "type": "function", "function": {"name": spec.name, "arguments": ""}}
            if "tool_args_dict" in modes:
                whole = dict(head, function={"name": spec.name, "arguments": json.loads(spec.arguments or "{}")})
                frames.append(self._tool_frame(whole))
                continue
            if "tool_all_at_once" in modes or "tool_ollama_index0" in modes:
                frames.append(self._tool_frame(dict(head, function={"name": spec.name, "arguments": spec.arguments})))
                continue
            frames.append(self._tool_frame(head))
            for piece in reply.text_pieces(spec.arguments):
                delta: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
                if "tool_repeat_id_name" in modes:
                    delta = {"index": index, "id": call_id, "type": "function",
                             "function": {"name": spec.name, "arguments": piece}}
                frames.append(self._tool_frame(delta))
        return frames

    def _tool_frame(self, delta: dict[str, Any]) -> _Frame:
        if "tool_no_index" in self.modes:
            delta = {k: v for k, v in delta.items() if k != "index"}
        return _Frame(_dumps(self._chunk({"tool_calls": [delta]})), content=True)

    def _chat_message(self) -> dict[str, Any]:
        reply = self.reply
        message: dict[str, Any] = {"role": "assistant", "content": _full_text(reply) or None, "refusal": None}
        if reply.calls:
            message["tool_calls"] = [
                {"id": self.call_ids[i], "type": "function", "function": {"name": s.name, "arguments": s.arguments}}
                for i, s in enumerate(reply.calls)
            ]
        if reply.reasoning:
            fields = ("reasoning_content", "reasoning") if reply.reasoning_field == "both" else (reply.reasoning_field,)
            for name in fields:
                message[name] = reply.reasoning
        return message

    def chat_completion(self) -> dict[str, Any]:
        message = self._chat_message()
        return {
            "id": self.cid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}],
            "usage": _chat_usage(self.usage),
        }

    # -- responses -------------------------------------------------------------

    def _output_items(self, streamed: bool = False) -> list[dict[str, Any]]:
        """The response's output; `streamed`: as `response.completed` carries it in this mode."""
        reply = self.reply
        items: list[dict[str, Any]] = []
        if reply.reasoning:
            items.append(self._reasoning_item(not streamed or self.reasoning_carrier in (None, "response.completed")))
        text = "".join(self.pieces)
        if text:
            items.append(self._message_item("msg_1", self._closing_text(text) if streamed else text,
                                            not streamed or self.text_carrier in (None, "response.completed")))
        for i, spec in enumerate(reply.calls):
            items.append({"id": f"fc_{i + 1}", "type": "function_call", "status": "completed",
                          "call_id": self.call_ids[i], "name": spec.name, "arguments": spec.arguments})
        if reply.text_after:
            text = reply.text_after
            items.append(self._message_item("msg_2", self._closing_text(text) if streamed else text,
                                            not streamed or self.text_carrier in (None, "response.completed")))
        return items

    def _reasoning_item(self, with_text: bool) -> dict[str, Any]:
        summary = [{"type": "summary_text", "text": self.reply.reasoning}] if with_text else []
        return {"id": "rs_1", "type": "reasoning", "summary": summary}

    def _closing_text(self, text: str) -> str:
        """The text closing events carry: the text, or one contradicting the deltas (text_done_differs)."""
        return "(revised) " + text if "text_done_differs" in self.modes else text

    @staticmethod
    def _message_item(item_id: str, text: str, with_text: bool = True) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if with_text else []
        return {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": content}

    def response_object(self, status: str, output: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        obj = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": self.model,
            "output": output if output is not None else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": _responses_usage(self.usage) if status in ("completed", "incomplete") else None,
        }
        obj.update(extra)
        return obj

    def responses_frames(self) -> list[_Frame]:
        reply, modes = self.reply, self.modes
        frames: list[_Frame] = []

        def add(kind: str, content: bool = False, final: bool = False, **payload: Any) -> None:
            frames.append(_Frame(_dumps({"type": kind, **payload}), kind, content, final))

        if "no_created" not in modes:
            add("response.created", response=self.response_object("in_progress"))
            add("response.in_progress", response=self.response_object("in_progress"))
        index = 0
        if reply.reasoning:
            carrier = self.reasoning_carrier
            add("response.output_item.added", output_index=index, item={"id": "rs_1", "type": "reasoning", "summary": []})
            add("response.reasoning_summary_part.added", item_id="rs_1", output_index=index, summary_index=0,
                part={"type": "summary_text", "text": ""})
            if carrier is None:
                for piece in self.reasoning_pieces:
                    add("response.reasoning_summary_text.delta", True, item_id="rs_1", output_index=index,
                        summary_index=0, delta=piece)
            if carrier in (None, "response.reasoning_summary_text.done"):
                add("response.reasoning_summary_text.done", carrier is not None, item_id="rs_1", output_index=index,
                    summary_index=0, text=reply.reasoning)
            if carrier is None:
                add("response.reasoning_summary_part.done", item_id="rs_1", output_index=index, summary_index=0,
                    part={"type": "summary_text", "text": reply.reasoning})
            add("response.output_item.done", output_index=index, item=self._reasoning_item(carrier is None))
            index += 1
        if self.pieces:
            index = self._message_frames(add, "msg_1", index, self.pieces)
        for i, spec in enumerate(reply.calls):
            item_id = f"fc_{i + 1}"
            if "call_in_completed" in modes:
                index += 1
                continue
            add("response.output_item.added", True, output_index=index,
                item={"id": item_id, "type": "function_call", "status": "in_progress",
                      "call_id": self.call_ids[i], "name": spec.name, "arguments": ""})
            arg_pieces = reply.text_pieces(spec.arguments)
            if "call_tail_in_completed" in modes:
                arg_pieces = arg_pieces[:-1]
            for piece in arg_pieces:
                add("response.function_call_arguments.delta", True, item_id=item_id, output_index=index, delta=piece)
            if "call_tail_in_completed" not in modes:
                add("response.function_call_arguments.done", item_id=item_id, output_index=index,
                    arguments=spec.arguments)
                add("response.output_item.done", output_index=index,
                    item={"id": item_id, "type": "function_call", "status": "completed",
                          "call_id": self.call_ids[i], "name": spec.name, "arguments": spec.arguments})
            index += 1
        if self.after_pieces:
            index = self._message_frames(add, "msg_2", index, self.after_pieces)
        if "incomplete" in modes:
            frames = self._cut_after_content(frames, 2)
            add("response.incomplete", final=True,
                response=self.response_object("incomplete", incomplete_details={"reason": "max_output_tokens"}))
        elif "eof" not in modes:
            add("response.completed", bool(modes & _COMPLETED_CARRIES), final=True,
                response=self.response_object("completed", self._output_items(streamed=True)))
        if "delta_before_item" in modes:
            frames = self._delta_first(frames)
        for n, frame in enumerate(frames):
            obj = json.loads(frame.data)
            obj["sequence_number"] = n if "seq_dup" not in modes else max(0, n - (n % 3 == 0))
            frame.data = _dumps(obj)
        return frames

    def _message_frames(self, add: Callable[..., None], item_id: str, index: int, pieces: list[str]) -> int:
        carrier = self.text_carrier
        text = self._closing_text("".join(pieces))
        add("response.output_item.added", output_index=index,
            item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
        add("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
            part={"type": "output_text", "text": "", "annotations": []})
        if carrier is None:
            for piece in pieces[:-1] if "text_tail_in_done" in self.modes else pieces:
                add("response.output_text.delta", True, item_id=item_id, output_index=index, content_index=0,
                    delta=piece, logprobs=[])
        if carrier in (None, "response.output_text.done"):
            add("response.output_text.done", carrier is not None, item_id=item_id, output_index=index, content_index=0,
                text=text, logprobs=[])
        if carrier in (None, "response.content_part.done"):
            add("response.content_part.done", carrier is not None, item_id=item_id, output_index=index,
                content_index=0, part={"type": "output_text", "text": text, "annotations": []})
        item_done = carrier == "response.output_item.done"
        add("response.output_item.done", item_done, output_index=index,
            item=self._message_item(item_id, text, carrier is None or item_done))
        return index + 1

    @staticmethod
    def _cut_after_content(frames: list[_Frame], keep: int) -> list[_Frame]:
        out, seen = [], 0
        for frame in frames:
            if frame.content:
                if seen == keep:
                    break
                seen += 1
            out.append(frame)
        return out

    @staticmethod
    def _delta_first(frames: list[_Frame]) -> list[_Frame]:
        """Move the first output_text.delta before its message's output_item.added."""
        first_delta = next((i for i, f in enumerate(frames) if f.event == "response.output_text.delta"), None)
        if first_delta is None:
            return frames
        added = max(i for i in range(first_delta) if frames[i].event == "response.output_item.added")
        frame = frames.pop(first_delta)
        frames.insert(added, frame)
        return frames

    def response_body(self) -> dict[str, Any]:
        return self.response_object("completed", self._output_items())


# ---------------------------------------------------------------------------
# SSE writing


class _Writer:
    """Serialises frames with the framing faults applied."""

    def __init__(self, resp: web.StreamResponse, modes: set[str], params: dict[str, float], record: RequestRecord) -> None:
        self.resp = resp
        self.record = record
        self.nl = "\r\n" if "crlf" in modes else "\n"
        self.byte_by_byte = "byte_by_byte" in modes
        self.multi = "multi_data_lines" in modes
        self.ids = "comment_after_id" in modes
        self.keepalive = "comment_keepalive" in modes
        self.drip = params["drip"] if "slow_drip" in modes else 0.0
        self.unterminated = False
        self.cut_final = False  # last_event_unterminated: the final events lose their blank line
        self._n = 0

    def encode(self, frame: _Frame) -> str:
        nl = self.nl
        lines: list[str] = []
        if frame.event:
            lines.append(f"event: {frame.event}")
        if self.ids:
            self._n += 1
            lines.append(f"id: {self._n}")
        if self.multi and frame.data.startswith("{"):
            lines.extend(f"data: {line}" for line in json.dumps(json.loads(frame.data), indent=1).split("\n"))
        else:
            lines.append(f"data: {frame.data}")
        text = nl.join(lines) + nl
        if not self.unterminated:
            text += nl
        if self.keepalive:
            text = f": OPENROUTER PROCESSING{nl}{nl}" + text
        return text

    async def raw(self, text: str) -> None:
        data = text.encode()
        if self.byte_by_byte:
            for i in range(len(data)):
                await self.resp.write(data[i : i + 1])
        else:
            await self.resp.write(data)
        if self.drip:
            await asyncio.sleep(self.drip)

    async def frame(self, frame: _Frame) -> None:
        if frame.final and self.cut_final:
            self.unterminated = True
        await self.raw(self.encode(frame))
        self.record.chunks_sent += 1


# ---------------------------------------------------------------------------
# The server


def _outage_error(status: int) -> dict[str, Any]:
    """The error body a provider in trouble sends (OpenAI's shapes)."""
    if status == 429:
        return _ERRORS["429"][1]
    if status == 400:
        return {"error": {"message": "Invalid request: messages[0].content is required.",
                          "type": "invalid_request_error", "param": "messages", "code": None}}
    if status == 401:
        return {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                          "param": None, "code": "invalid_api_key"}}
    return {"error": {"message": "The server had an error while processing your request. Sorry about that!",
                      "type": "server_error", "param": None, "code": "overloaded" if status == 503 else None}}


_ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "429": (429, {"error": {"message": "Rate limit reached for requests per min. Please try again in 1ms.",
                            "type": "requests", "param": None, "code": "rate_limit_exceeded"}}),
    "reject_stream": (400, {"error": {"message": "Unsupported value: 'stream' does not support true with this model. "
                                                 "Supported values are: false.",
                                      "type": "invalid_request_error", "param": "stream", "code": "unsupported_value"}}),
    "reject_stream_403": (403, {"error": {"message": "Streaming requests are not yet allowed.",
                                          "type": "invalid_request_error", "param": None, "code": None}}),
    "reject_stream_options": (400, {"error": {"message": "Unrecognized request argument supplied: stream_options",
                                              "type": "invalid_request_error", "param": None, "code": None}}),
    "reject_stream_options_422": (422, {"object": "error", "message": "Extra inputs are not permitted: stream_options",
                                        "type": "invalid_request_error", "param": None, "code": None}),
    "reject_stream_options_500": (500, {"error": {"message": "extraneous key [include_usage] is not permitted",
                                                  "type": "server_error", "param": None, "code": None}}),
    "nonstream_500": (500, {"error": {"message": "The server had an error while processing your request.",
                                      "type": "server_error", "param": None, "code": None}}),
    "nonstream_400": (400, {"error": {"message": "This model's maximum context length is 128000 tokens.",
                                      "type": "invalid_request_error", "param": "messages",
                                      "code": "context_length_exceeded"}}),
    "nonstream_429": (429, {"error": {"message": "Rate limit reached for requests per min.",
                                      "type": "requests", "param": None, "code": "rate_limit_exceeded"}}),
}
_WHISPER_FORMATS = frozenset({"flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"})
_CONTEXT_ERROR = {"error": {"message": "the request exceeds the available context size, try increasing it",
                            "type": "exceed_context_size_error", "code": 400}}


class FakeLLM:
    """The fake provider. `async with FakeLLM() as fake:` or the `fake_llm` fixture."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        listed_models: Sequence[str] | None = (DEFAULT_MODEL, OTHER_MODEL),
    ) -> None:
        self.api_key = api_key
        # What GET /models lists; None: no such endpoint (404). Tests may change it any time.
        self.listed_models: list[str] | None = list(listed_models) if listed_models is not None else None
        self.host = host
        self.port = port
        self.requests: list[RequestRecord] = []
        self.in_flight: dict[str, int] = {}  # path -> requests being answered now
        self.max_in_flight: dict[str, int] = {}  # path -> the most at once since the last reset
        self._script: list[_Entry] = []
        self.blind_models: set[str] = set()  # models that refuse any image input
        # A provider-wide outage, whatever the model: every chat/responses request gets this
        # HTTP status (429, 500, 503 ...) with an OpenAI-shaped error, or -- `stall_all` --
        # waits that many seconds before answering at all. None: normal service.
        self.outage: int | None = None
        self.stall_all: float | None = None
        self.transcriptions: list[TranscriptionRecord] = []
        self._transcripts: list[str | TranscriptionFault] = []
        self._ids = _Ids()
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    def app(self) -> web.Application:
        # Requests with images carry megabytes of base64 (aiohttp's default cap is 1 MiB);
        # OpenAI takes request bodies of tens of MB.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        app.router.add_get("/_fake/requests", self._http_requests)
        app.router.add_post("/_fake/reset", self._http_reset)
        return app

    async def start(self) -> FakeLLM:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def config(self, **overrides: Any) -> Any:
        """A `ProviderConfig` for this fake: fast timeouts, no SDK retries (override anything)."""
        from agent import ProviderConfig, Timeouts

        values: dict[str, Any] = {
            "base_url": self.base_url,
            "api_key": self.api_key,
            "model": DEFAULT_MODEL,
            "timeouts": Timeouts(connect=5, first_token=10, idle=10, total=30),
            "max_retries": 0,
        }
        values.update(overrides)
        return ProviderConfig(**values)

    # -- scripting -----------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests (models not starting with fault:/bench:)."""
        self._script.extend(_Entry(r) for r in replies)

    def script_transcripts(self, *items: str | TranscriptionFault) -> None:
        """Queue answers for the next transcription requests: a text, or a failure."""
        self._transcripts.extend(items)

    @property
    def pending(self) -> int:
        """Script entries not yet consumed."""
        return len(self._script)

    def reset(self) -> None:
        self._script.clear()
        self.requests.clear()
        self._transcripts.clear()
        self.transcriptions.clear()
        self.max_in_flight = dict(self.in_flight)
        self._notify()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
        """Wait until `predicate()` is true; it is re-checked whenever a request changes state."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise AssertionError(
                f"fake_llm.wait_for timed out after {timeout}s; requests: "
                f"{[(r.id, r.model, r.stream, r.status, r.t_done is not None) for r in self.requests]}"
            ) from None

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- request plumbing --------------------------------------------------------

    def _record(self, api: str, body: dict[str, Any]) -> RequestRecord:
        messages = body.get("messages") if api == "chat" else body.get("input")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if api == "responses" and body.get("instructions"):
            messages = [{"role": "system", "content": body["instructions"]}, *(messages or [])]
        record = RequestRecord(
            id=len(self.requests) + 1,
            api=api,
            model=body.get("model"),
            stream=bool(body.get("stream")),
            stream_options="stream_options" in body,
            messages=list(messages or []),
            tools=body.get("tools"),
            body=body,
            t_received=time.monotonic(),
        )
        record.images = image_urls(record.messages)
        self.requests.append(record)
        self._notify()
        return record

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "") == f"Bearer {self.api_key}"

    def _unauthorized(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        masked = f"{given[:3]}***{given[-4:]}" if len(given) > 8 else "***"
        return web.json_response(
            {"error": {"message": f"Incorrect API key provided: {masked}. You can find your API key at "
                                  "https://platform.openai.com/account/api-keys.",
                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
            status=401,
        )

    def _plan(self, api: str, record: RequestRecord) -> _Plan | web.Response:
        model = record.model or ""
        if model.startswith("bench:"):
            params = {"tokens": 600, "rate": 30, "ttft": 0.2, "chunk": 1, "seed": 7, "tick": 0.05}
            try:
                params.update(_parse_kv(model.removeprefix("bench:")))
            except ValueError:
                return _error(400, f"fake: bad bench spec {model!r}")
            chunks = _bench_chunks(int(params["tokens"]), int(params["seed"]), int(params["chunk"]))
            return _Plan(Reply(pieces=chunks), set(), dict(_PARAM_DEFAULTS), "bench", params)
        if model.startswith("fault:"):
            try:
                modes, params = _parse_fault(model.removeprefix("fault:"))
            except ValueError:
                return _error(400, f"fake: bad fault spec {model!r}")
            known = CHAT_FAULTS if api == "chat" else RESPONSES_FAULTS
            unknown = sorted(modes - set(known))
            if unknown:
                return _error(400, f"fake: unknown fault mode(s) {unknown} for {api}")
            return _Plan(_reply_for_modes(modes, record.messages), self._active(modes, record.stream), params, "fault")
        entry = self._take(record.stream, retry=record.sdk_retry > 0)
        if entry is None:
            return _Plan(self._default_reply(record.messages), set(), dict(_PARAM_DEFAULTS), "default")
        modes, params = _parse_fault(entry.reply.fault or "")
        known = CHAT_FAULTS if api == "chat" else RESPONSES_FAULTS
        unknown = sorted(modes - set(known))
        if unknown:
            return _error(400, f"fake: unknown fault mode(s) {unknown} for {api}")
        active = self._active(modes, record.stream)
        if not record.stream_options:
            active -= _STREAM_OPTIONS_FAULTS  # nothing to reject
        if record.stream and entry.stream_fault_used:
            active &= _QUIRKS | _BOTH_FAULTS
        if entry.status_fault_used:
            active -= _BOTH_FAULTS
        plan = _Plan(entry.reply, active, params, "script", entry=entry)
        faults = active - _QUIRKS
        if faults & _BOTH_FAULTS:  # the SDK retries the same request: serve it again, clean
            entry.status_fault_used = True
            self._put_back(plan, awaiting_fallback=False)
        elif faults:  # the step's fallback (non-streaming) request gets this entry, complete
            entry.stream_fault_used = entry.stream_fault_used or record.stream
            self._put_back(plan, awaiting_fallback=True)
        return plan

    def _take(self, stream: bool, *, retry: bool = False) -> _Entry | None:
        """Pop the entry for a new request.

        A streaming request first drops entries still waiting for a fallback request that
        never came (an interrupted turn does not fall back): it starts a new step -- unless
        it is the SDK retrying the request that just failed with an error status, which
        continues the same step (its fault already struck, so it is served clean).
        """
        if stream and not retry:
            while self._script and self._script[0].awaiting_fallback:
                self._script.pop(0)
        if not self._script:
            return None
        entry = self._script.pop(0)
        entry.awaiting_fallback = False
        return entry

    def _put_back(self, plan: _Plan, *, awaiting_fallback: bool) -> None:
        if plan.entry is None or plan.put_back:
            return
        plan.put_back = True
        plan.entry.awaiting_fallback = awaiting_fallback
        self._script.insert(0, plan.entry)

    @staticmethod
    def _active(modes: set[str], stream: bool) -> set[str]:
        """The modes that apply to this request kind."""
        if stream:
            return {m for m in modes if m not in _NONSTREAM_FAULTS}
        return {m for m in modes if m in _NONSTREAM_FAULTS or m in _BOTH_FAULTS or m in _QUIRKS}

    def _default_reply(self, messages: list[Any]) -> Reply:
        outputs = _tool_outputs(messages)
        if outputs is not None:
            return Reply.text("Tool results: " + "; ".join(outputs))
        return Reply.text(f"You said: {_last_user_text(messages)}")

    async def _read(self, request: web.Request, api: str) -> tuple[RequestRecord | None, web.StreamResponse | None]:
        if not self._authorized(request):
            try:
                body = await request.json()
            except ValueError:
                body = {}
            record = self._record(api, body if isinstance(body, dict) else {})
            record.status = 401
            record.t_done = time.monotonic()
            return record, self._unauthorized(request)
        raw = await request.read()
        arrived = time.monotonic()  # the whole request is here (parsing it is the fake's own time)
        try:
            body = json.loads(raw)
        except ValueError:
            return None, _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return None, _error(400, "The request body must be a JSON object.")
        record = self._record(api, body)
        record.t_received = arrived
        try:
            record.sdk_retry = int(request.headers.get("x-stainless-retry-count", "0"))
        except ValueError:
            record.sdk_retry = 0
        try:
            record.read_timeout = float(request.headers["x-stainless-read-timeout"])
        except (KeyError, ValueError):
            record.read_timeout = None
        if "stream_options" in body and not body.get("stream"):
            return record, _error(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                  param="stream_options")
        return record, None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "responses")

    async def _handle(self, request: web.Request, api: str) -> web.StreamResponse:
        record, early = await self._read(request, api)
        plan: _Plan | web.StreamResponse | None = None
        path = request.path
        if record is not None:
            record.path = path
            record.concurrent = self.in_flight.get(path, 0)
            self.in_flight[path] = record.concurrent + 1
            self.max_in_flight[path] = max(self.max_in_flight.get(path, 0), record.concurrent + 1)
        try:
            if early is not None:
                if record is not None:
                    record.status = early.status
                return early
            assert record is not None
            if self.stall_all:
                await asyncio.sleep(self.stall_all)
            if self.outage is not None:
                record.status = self.outage
                return web.json_response(_outage_error(self.outage), status=self.outage, headers={"retry-after-ms": "1"})
            refused = self._refuse_images(api, record)
            if refused is not None:
                record.status = refused.status
                return refused
            plan = self._plan(api, record)
            if isinstance(plan, web.StreamResponse):
                record.status = plan.status
                return plan
            record.source = plan.source
            record.faults = sorted(plan.modes)
            for mode in sorted(plan.modes):
                if mode in _ERRORS and (mode not in _STREAM_OPTIONS_FAULTS or record.stream_options):
                    status, payload = _ERRORS[mode]
                    record.status = status
                    headers = {"retry-after-ms": "1"} if status == 429 or status >= 500 else {}
                    return web.json_response(payload, status=status, headers=headers)
            builder = _Builder(plan.reply, plan.modes, record.model or DEFAULT_MODEL, record.messages, self._ids)
            if not record.stream:
                if "nonstream_200_error" in plan.modes:
                    if api == "responses":
                        return web.json_response(builder.response_object(
                            "failed", error={"code": "server_error", "message": "The model failed to respond."}))
                    return web.json_response(_CONTEXT_ERROR)
                if "first_byte_late" in plan.modes:
                    await asyncio.sleep(plan.params["late"])
                await self._wait_hold(plan.reply, 0)
                record.t_first_token_sent = time.monotonic()
                body = builder.chat_completion() if api == "chat" else builder.response_body()
                return web.json_response(body)
            if plan.bench is not None:
                return await self._serve_bench(request, record, plan, builder, api)
            return await self._serve_stream(request, record, plan, builder, api)
        except asyncio.CancelledError:
            if record is not None:
                record.disconnected = True
                if record.stream and isinstance(plan, _Plan):
                    # The client gave up on a clean stream (timeout, interrupt): its fallback
                    # request, if one comes, must get the same reply.
                    self._put_back(plan, awaiting_fallback=True)
            raise
        finally:
            if record is not None:
                self.in_flight[path] -= 1
                record.t_done = time.monotonic()
                self._notify()

    def _refuse_images(self, api: str, record: RequestRecord) -> web.Response | None:
        """What OpenAI says to images a model cannot take, or to bytes that are no image."""
        if not record.images:
            return None
        if record.model in self.blind_models:
            kind = "image_url" if api == "chat" else "input_image"
            return web.json_response(
                {"error": {"message": f"Invalid content type. {kind} is only supported by certain models.",
                           "type": "invalid_request_error", "param": "messages.[0].content.[1].type", "code": None}},
                status=400,
            )
        for url in record.images:
            if not url.startswith("data:"):
                continue  # a remote URL: the real API would fetch it; the fake takes it on trust
            data = _data_url_bytes(url)
            if data is None or not _is_image(data):
                return web.json_response(
                    {"error": {"message": "You uploaded an unsupported image. Please make sure your image has of one "
                                          "the following formats: ['png', 'jpeg', 'gif', 'webp'].",
                               "type": "invalid_request_error", "param": None, "code": "invalid_image_format"}},
                    status=400,
                )
        return None

    async def _transcriptions(self, request: web.Request) -> web.Response:
        """Whisper's endpoint: multipart `model` + `file` in, `{"text": ...}` out."""
        if not self._authorized(request):
            return self._unauthorized(request)
        fields: dict[str, str] = {}
        filename: str | None = None
        content_type: str | None = None
        data = b""
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.name == "file":
                    filename = part.filename
                    content_type = part.headers.get("Content-Type")
                    data = bytes(await part.read())
                elif part.name:
                    fields[part.name] = await part.text()
        except (ValueError, AssertionError, KeyError):
            return _error(400, "The request body must be multipart/form-data.")
        record = TranscriptionRecord(
            model=fields.get("model"), filename=filename, content_type=content_type, data=data, fields=fields,
            t_received=time.monotonic(),
        )
        self.transcriptions.append(record)
        try:
            if not record.model:
                record.status = 400
                return _error(400, "you must provide a model parameter", param="model")
            if filename is None:
                record.status = 400
                return _error(400, "1 validation error for Request\nbody -> file\n  field required", param="file")
            extension = filename.rpartition(".")[2].lower() if "." in filename else ""
            if extension not in _WHISPER_FORMATS:
                record.status = 400
                return _error(400, f"Invalid file format. Supported formats: {sorted(_WHISPER_FORMATS)}", param="file")
            if not data:
                record.status = 400
                return web.json_response(
                    {"error": {"message": "Audio file is too short. Minimum audio length is 0.1 seconds.",
                               "type": "invalid_request_error", "param": "file", "code": "audio_too_short"}},
                    status=400,
                )
            item = self._transcripts.pop(0) if self._transcripts else f"(transcript of {len(data)} bytes)"
            if isinstance(item, TranscriptionFault):
                if item.hold is not None:
                    await item.hold.wait()
                record.status = item.status
                kind = "server_error" if item.status >= 500 else "invalid_request_error"
                return web.json_response(
                    {"error": {"message": item.message, "type": kind, "param": None, "code": None}}, status=item.status
                )
            record.text = item
            if fields.get("response_format") == "text":
                return web.Response(text=item)
            return web.json_response({"text": item})
        finally:
            self._notify()

    @staticmethod
    async def _wait_hold(reply: Reply, sent: int) -> None:
        if reply.hold is not None and sent == reply.hold_at:
            await reply.hold.wait()

    async def _serve_stream(
        self, request: web.Request, record: RequestRecord, plan: _Plan, builder: _Builder, api: str
    ) -> web.StreamResponse:
        modes, params, reply = plan.modes, plan.params, plan.reply
        if "headers_late" in modes or "first_byte_late" in modes:
            await asyncio.sleep(params["late"])
        if "200_error_json" in modes:
            return web.json_response(_CONTEXT_ERROR)
        if "ignore_stream" in modes:
            return web.json_response(builder.chat_completion() if api == "chat" else builder.response_body())
        ctype = "text/plain; charset=utf-8" if "text_plain" in modes else "text/event-stream; charset=utf-8"
        resp = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        writer = _Writer(resp, modes, params, record)
        nl = writer.nl
        if "llamacpp_error_field" in modes:
            await writer.raw(f"error: {_dumps(_CONTEXT_ERROR['error'])}{nl}{nl}data: [DONE]{nl}{nl}")
            await resp.write_eof()
            return resp
        if "last_event_unterminated" in modes:
            writer.cut_final = True

        frames = builder.chat_frames(bool((record.body.get("stream_options") or {}).get("include_usage"))) \
            if api == "chat" else builder.responses_frames()
        if "slow_cancel" in modes:
            reply.delay = params["interval"]
        sent = 0
        # Faults strike after the 1st / 2nd content event, or as early as a short reply allows.
        n_content = sum(1 for f in frames if f.content)
        first_point, second_point = min(1, n_content), min(2, n_content)
        struck_first = struck_second = False
        for frame in frames:
            if frame.content:
                if sent == 0:
                    if "keepalive_only" in modes:
                        await self._keepalive(writer, params)
                    if reply.ttft:
                        await asyncio.sleep(reply.ttft)
                elif reply.delay:
                    await asyncio.sleep(reply.delay)
                await self._wait_hold(reply, sent)
            await writer.frame(frame)
            if frame.content:
                sent += 1
                if record.t_first_token_sent is None:
                    record.t_first_token_sent = time.monotonic()
            if not struck_first and sent >= first_point:
                struck_first = True
                if await self._after_first(writer, resp, modes, params, api, builder):
                    return resp
            if not struck_second and sent >= second_point:
                struck_second = True
                if "abort_midstream" in modes:
                    await self._abort(request)
                    return resp
                if "eof_no_done" in modes:
                    await resp.write_eof()
                    return resp
        if "done_marker" in modes or api == "chat":
            done = "data:[DONE]" if "done_nospace" in modes else "data: [DONE]"
            await writer.raw(done + nl + ("" if writer.unterminated else nl))
            if "trailing_after_done" in modes:
                await writer.raw(f'data: {{"junk": true}}{nl}{nl}')
        await resp.write_eof()
        return resp

    @staticmethod
    async def _keepalive(writer: _Writer, params: dict[str, float]) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + params["keepalive"]
        while loop.time() < until:
            await writer.raw(f": keepalive{writer.nl}{writer.nl}")
            await asyncio.sleep(params["keepalive_every"])

    @staticmethod
    async def _abort(request: web.Request) -> None:
        """Close the TCP connection mid-body (an incomplete chunked response for the client)."""
        transport = request.transport
        if transport is not None:
            transport.close()
        await asyncio.sleep(5)  # connection_lost cancels this handler (handler_cancellation=True)

    async def _after_first(
        self, writer: _Writer, resp: web.StreamResponse, modes: set[str], params: dict[str, float], api: str, b: _Builder
    ) -> bool:
        """Faults that strike right after the first content event; True ends the response."""
        nl = writer.nl
        if "comment_after_id" in modes:
            await writer.raw(f": ping{nl}{nl}")
        if "retry_directive" in modes:
            await writer.raw(f"retry: 3000{nl}{nl}")
        if "event_ping_nodata" in modes:
            await writer.raw(f"event: ping{nl}{nl}")
        if "data_comment" in modes:
            await writer.raw(f"data: : OPENROUTER PROCESSING{nl}{nl}")
        if "junk_data" in modes:
            await writer.raw(f"data: <html><body>502 Bad Gateway</body></html>{nl}{nl}")
        if "stall" in modes:
            await asyncio.sleep(params["stall"])
        error: _Frame | None = None
        if "midstream_error" in modes:
            error = _Frame(_dumps({"error": {"message": "The server is overloaded, please try again.",
                                             "type": "server_error", "code": "overloaded"}}))
        elif "midstream_error_event" in modes:
            error = _Frame(_dumps({"error": {"message": "boom", "code": 500}}), event="error")
        elif "midstream_error_string" in modes:
            error = _Frame(_dumps({"error": "Internal server error"}))
        elif "connection_lost_error" in modes:
            error = _Frame(_dumps({"error": {"message": "Network connection lost.", "code": 502}}))
        elif "openrouter_error_chunk" in modes:
            error = _Frame(_dumps({"id": b.cid, "object": "chat.completion.chunk", "created": b.created,
                                   "model": b.model,
                                   "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
                                   "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}))
        elif "failed" in modes:
            error = _Frame(_dumps({"type": "response.failed", "sequence_number": 900, "response": b.response_object(
                "failed", error={"code": "server_error", "message": "The model failed to generate a response."})}),
                event="response.failed")
        elif "error_event" in modes:
            error = _Frame(_dumps({"type": "error", "sequence_number": 900, "code": "server_error",
                                   "message": "Something went wrong.", "param": None}), event="error")
        elif "error_event_nested" in modes:
            error = _Frame(_dumps({"type": "error", "sequence_number": 900,
                                   "error": {"code": "server_error", "message": "Something went wrong.", "param": None}}),
                           event="error")
        if error is None:
            return False
        await writer.frame(error)
        await resp.write_eof()  # providers close the stream after an error event

        return True

    async def _serve_bench(
        self, request: web.Request, record: RequestRecord, plan: _Plan, builder: _Builder, api: str
    ) -> web.StreamResponse:
        """Stream a `bench:` reply on schedule: chunk i is due at ttft + i*chunk/rate.

        Writes coalesce everything due at each wake-up and sleep at least `tick`, so a
        thousand concurrent streams cost a few wake-ups per second each, not one per token.
        """
        bench = plan.bench or {}
        include_usage = bool((record.body.get("stream_options") or {}).get("include_usage"))
        frames = builder.chat_frames(include_usage) if api == "chat" else builder.responses_frames()
        tail = "data: [DONE]\n\n" if api == "chat" else ""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        rate, ttft, per_chunk, tick = bench["rate"], bench["ttft"], max(1.0, bench["chunk"]), bench["tick"]
        encoded = [f"event: {f.event}\ndata: {f.data}\n\n" if f.event else f"data: {f.data}\n\n" for f in frames]
        loop = asyncio.get_running_loop()
        start = loop.time()
        if rate <= 0:
            if ttft > 0:
                await asyncio.sleep(ttft)
            record.t_first_token_sent = time.monotonic()
            body = ("".join(encoded) + tail).encode()
            for offset in range(0, len(body), 65536):
                await resp.write(body[offset : offset + 65536])
            record.chunks_sent = len(frames)
            await resp.write_eof()
            return resp
        # Schedule: non-content frames go out with the next content frame.
        due: list[float] = []
        content_index = 0
        for frame in frames:
            if frame.content:
                due.append(start + ttft + content_index * per_chunk / rate)
                content_index += 1
            else:
                due.append(due[-1] if due else start + ttft)
        i = 0
        while i < len(frames):
            now = loop.time()
            if due[i] > now:
                await asyncio.sleep(max(due[i] - now, tick))
                now = loop.time()
            j = i
            while j < len(frames) and due[j] <= now:
                j += 1
            j = max(j, i + 1)
            if record.t_first_token_sent is None and any(f.content for f in frames[i:j]):
                record.t_first_token_sent = time.monotonic()
            await resp.write("".join(encoded[i:j]).encode())
            record.chunks_sent += j - i
            i = j
        if tail:
            await resp.write(tail.encode())
        await resp.write_eof()
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        if self.listed_models is None:  # a server without the route: aiohttp's own 404
            raise web.HTTPNotFound()
        if not self._authorized(request):
            return self._unauthorized(request)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "parley"} for m in self.listed_models]
        return web.json_response({"object": "list", "data": data})

    async def _http_requests(self, request: web.Request) -> web.Response:
        brief = request.query.get("brief", "") not in ("", "0", "false")
        return web.json_response({"requests": [r.to_dict(brief) for r in self.requests]})

    async def _http_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


_STREAM_OPTIONS_FAULTS = {"reject_stream_options", "reject_stream_options_422", "reject_stream_options_500"}
# Payload quirks: they change the shape of a *valid* answer and are not failures, so a
# scripted entry served with one of them is consumed like a clean reply. The empty-data
# framings and a JSON answer to a stream request are quirks too: parley's SSE reader
# takes them in stride (the SDK's stream wrapper did not).
_QUIRKS = {
    "normal", "crlf", "byte_by_byte", "multi_data_lines", "text_plain", "comment_keepalive", "slow_drip",
    "comment_after_id", "retry_directive", "event_ping_nodata", "data_comment", "ignore_stream",
    "keepalive_only", "headers_late", "first_byte_late", "reasoning", "reasoning_openrouter", "reasoning_mirrored", "tool_std",
    "done_nospace", "trailing_after_done", "null_choices", "empty_choices_mid", "azure_filter", "role_every_chunk",
    "usage_every_chunk", "empty_finish_reason", "think_in_content", "tool_all_at_once", "stop_with_tools",
    "double_finish", "tool_repeat_id_name", "tool_no_index", "tool_ollama_index0", "tool_int_id", "tool_args_dict",
    "hermes_xml", "no_created", "done_marker", "seq_dup", "delta_before_item", "slow_cancel", "incomplete",
    "whole_message_chunk", "message_only_chunk", "message_in_last_chunk", "tool_calls_in_last_chunk",
    *_TEXT_CARRIERS, "text_tail_in_done", "text_done_differs", "call_in_completed", "call_tail_in_completed",
    *_REASONING_CARRIERS,
}


def _error(status: int, message: str, *, param: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}, status=status
    )


# ---------------------------------------------------------------------------
# Standalone


async def _serve_forever(host: str, port: int, api_key: str, listed_models: Sequence[str] | None) -> None:
    fake = FakeLLM(api_key=api_key, host=host, port=port, listed_models=listed_models)
    await fake.start()
    print(f"fake-llm listening on {fake.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible provider for parley tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8083, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--api-key", default=API_KEY)
    parser.add_argument("--list-models", default=f"{DEFAULT_MODEL},{OTHER_MODEL}",
                        help="comma-separated ids GET /v1/models lists")
    parser.add_argument("--no-models-endpoint", action="store_true", help="answer GET /v1/models with 404")
    args = parser.parse_args(argv)
    listed = None if args.no_models_endpoint else [m for m in args.list_models.split(",") if m]
    asyncio.run(_serve_forever(args.host, args.port, args.api_key, listed))


if __name__ == "__main__":
    main()
