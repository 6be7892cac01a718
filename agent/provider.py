"""One model call against an OpenAI-compatible provider, in either API mode.

The rule this module exists for: a provider's broken streaming never reaches the user.
`Provider.complete` streams when someone consumes deltas; *any* failure while opening
or reading the stream (rejection of `stream`/`stream_options`, a dropped connection, a
malformed or non-JSON chunk, a stall, an in-band error, a stream that ends without a
finish reason or with no chunks at all) is answered by exactly one non-streaming
request for the same step. The cause is logged at INFO and recorded on the response
(`fell_back`, `fallback_cause`); the consumer gets `on_fallback(final_text)` so the chat
can replace its partial preview with the complete reply. If the non-streaming request
fails too, *its* error propagates as a typed `ProviderError`.

Errors that no other request shape can fix (401/403 auth, 404 unknown model, 429 after
the SDK's own retries) are raised at once instead of being doubled by a fallback.

After `stream_failure_threshold` consecutive streaming failures for one model, streaming
is skipped for `stream_cooldown` seconds (`StreamHealth`).

The lean path: `openai.AsyncOpenAI` still builds and sends every request (auth,
base_url, timeouts, its retries, typed status errors raised *before* the body), but a
streamed body is read here (`with_streaming_response` hands over the `httpx2` response
untouched): `agent.sse.SSEDecoder` + `json.loads` into the dict accumulators of
`agent.stream`. The SDK's stream wrapper built a model object per chunk -- most of
parley's CPU under load. Consequences worth knowing:

- empty-data SSE events (keepalives after an `id:` line, `retry:`, `event: ping`) and
  comments a proxy re-wrapped as `data: : ...` are skipped instead of breaking the stream;
- a stream request answered with `Content-Type: application/json` is read as the complete
  answer (no second request) when it is one, and as the provider's in-band error (a
  fallback with cause `in_band_error`) when it carries an `error`;
- transport failures mid-body arrive as `httpx2` exceptions (`RemoteProtocolError`,
  `ReadTimeout`, ...), mapped to the same causes the SDK's wrappers used to produce.

Clocks: one `_Watchdog` per request (a single timer handle re-armed lazily, never a task
or a `wait_for` per chunk) enforces first-token, idle and total deadlines. The transport's
own timeouts (`Timeouts.transport_read`) are backstops set *later* than those: a transport
timeout is something the SDK answers by sending the request again (`max_retries`), so if
it fired first, a provider that was merely slow to send its headers would get -- and bill
-- the same request twice. With the watchdog deciding, the whole SDK call (any retry it
had planned included) is cancelled and its connection closed before this module sends
anything else for the step. The SDK still retries what is safe to retry: a failed
connect, 429 and 5xx answers -- each after the previous attempt has ended.

Every HTTP request sent (SDK retries included) is reported to an optional
`RequestObserver` -- `kind` "stream" | "request" | "probe", `attempt` "first" | "retry"
(the SDK's) | "fallback" (the non-streaming answer to a broken stream) -- so operators can
see what a provider bills (`bots/metrics.py`: `parley_provider_requests_total`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from .config import ProviderConfig
from .errors import (
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderError,
    ProviderNoVision,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
)
from .events import TurnEvents
from .media import has_images
from .sse import SSEDecoder
from .stream import (
    ChatAccumulator,
    ModelResponse,
    ResponsesAccumulator,
    StreamBroken,
    in_band_error,
    response_from_chat_completion,
    response_from_responses,
)

__all__ = [
    "ProbeResult",
    "Provider",
    "RequestObserver",
    "StepState",
    "StreamHealth",
    "provider_host",
    "to_provider_error",
    "to_responses_input",
]

log = logging.getLogger(__name__)

# Messages of a provider that cannot stream, or cannot take `stream_options` (§7.3, quirks #1-#6).
_STREAM_OPTIONS_RE = re.compile(r"stream_options|include_usage", re.IGNORECASE)
_STREAM_RE = re.compile(
    r"'stream'|\bstream\b.*\b(not|unsupported|does not)|does not support true|streaming requests are not"
    r"|streaming is not supported|unsupported value: 'stream'",
    re.IGNORECASE,
)
# A request with images refused because of them: what "this model cannot see" looks like in
# the wild -- OpenAI "Invalid content type. image_url is only supported by certain models.",
# OpenRouter 404 "No endpoints found that support image input", DeepSeek 422 "unknown variant
# `image_url`, expected `text`", vLLM "... is not a multimodal model".
_VISION_RE = re.compile(r"image|vision|multi-?modal", re.IGNORECASE)
# ...unless the complaint is about this image, not about images: too large, a format the
# model does not take, bytes it cannot decode. The model can see; this picture failed.
_BAD_IMAGE_RE = re.compile(
    r"too large|too big|exceeds|maximum (file )?size|dimension|invalid (base64|image)|unsupported image"
    r"|image format|media type|could not (process|decode|read|load)|corrupt|valid image"
    r"|does not exist|no such model",  # a model named like "gpt-image-1" that is not there
    re.IGNORECASE,
)
_VISION_STATUSES = frozenset({400, 404, 415, 422})


class RequestObserver(Protocol):
    """Told about every HTTP request sent to the provider, as it leaves (for metrics).

    `kind`: "stream", "request" (non-streaming) or "probe" (`parley check`). `attempt`:
    "first", "retry" (the SDK sending the same request again after a failed connect, a
    429 or a 5xx) or "fallback" (the non-streaming request that answers a step whose
    stream broke). Called on the request's task; must be cheap. Exceptions are logged
    and ignored.
    """

    def __call__(self, kind: str, attempt: str) -> None: ...


# What the SDK call running on this task is, for the transport's request hook: the hook
# sees only an HTTP request, not why parley sent it.
_CALL: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("parley_provider_call", default=("request", "first"))


@contextlib.contextmanager
def _calling(kind: str, attempt: str = "first") -> Iterator[None]:
    token = _CALL.set((kind, attempt))
    try:
        yield
    finally:
        _CALL.reset(token)


def _guard(fn: Callable[..., Any], name: str) -> Callable[..., None]:
    """Wrap a consumer callback: a bug in a chat's event handler must not break the turn."""

    def call(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("TurnEvents.%s raised; ignored", name)

    return call


class _WatchdogTimeout(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class _Watchdog:
    """First-token, idle and total deadlines for one request, with one timer handle.

    The reading loop only stores `last = loop.time()` per chunk; the timer wakes at the
    earliest deadline, re-arms itself if activity moved it, and otherwise cancels the
    task. `__exit__` turns that cancellation into `_WatchdogTimeout` (the same
    `uncancel` bookkeeping as `asyncio.timeout`), so an outside cancellation still
    propagates as `CancelledError`.
    """

    __slots__ = ("_acc", "_first_token", "_idle", "_total", "_loop", "_task", "_baseline", "_handle", "start", "last", "fired")

    def __init__(self, acc: Any, *, first_token: float | None, idle: float | None, total: float | None) -> None:
        self._acc = acc
        self._first_token = first_token
        self._idle = idle
        self._total = total
        self._handle: asyncio.TimerHandle | None = None
        self.fired: str | None = None
        self.start = self.last = 0.0

    def __enter__(self) -> _Watchdog:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._baseline = task.cancelling()
        self.start = self.last = self._loop.time()
        self._arm()
        return self

    def _next(self) -> tuple[float | None, str]:
        when: float | None = None
        cause = ""
        if self._total is not None:
            when, cause = self.start + self._total, "total_timeout"
        acc = self._acc
        if acc is not None and acc.started:
            if self._idle is not None:
                idle_at = self.last + self._idle
                if when is None or idle_at < when:
                    when, cause = idle_at, "idle_timeout"
        elif acc is not None and self._first_token is not None:
            first_at = self.start + self._first_token
            if when is None or first_at < when:
                when, cause = first_at, "first_token_timeout"
        return when, cause

    def _arm(self) -> None:
        when, _ = self._next()
        if when is not None:
            self._handle = self._loop.call_at(when, self._check)

    def rearm(self) -> None:
        """Deadlines only move later with activity, except at the first delta, when the
        (usually long) first-token clock hands over to the idle clock: re-arm then."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.fired is None:
            self.last = self._loop.time()
            self._arm()

    def _check(self) -> None:
        self._handle = None
        when, cause = self._next()
        if when is None:
            return
        if self._loop.time() >= when:
            self.fired = cause
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(when, self._check)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.fired is not None:
            remaining = self._task.uncancel()
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and remaining <= self._baseline:
                raise _WatchdogTimeout(self.fired) from exc


@dataclass(slots=True)
class StepState:
    """What the turn can see of a model call in flight (for interrupts and metrics)."""

    acc: ChatAccumulator | ResponsesAccumulator | None = None
    started_at: float | None = None
    first_delta_at: float | None = None
    first_fired: bool = False

    @property
    def visible_text(self) -> str:
        return self.acc.visible_text if self.acc is not None else ""


@dataclass(slots=True)
class _ModelHealth:
    consecutive_failures: int = 0
    cooldown_until: float | None = None
    last_cause: str | None = None
    last_error_class: str | None = None
    fallbacks: int = 0
    stream_options_ok: bool = True


class StreamHealth:
    """Per-model streaming health: consecutive failures and the cooldown that follows them.

    After the cooldown the next attempt streams again as a probe: success resets the
    count, another failure starts a new cooldown. A provider that rejects `stream`
    outright enters the cooldown at once (it will not change its mind per request).
    """

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._models: dict[str, _ModelHealth] = {}

    def get(self, model: str) -> _ModelHealth:
        health = self._models.get(model)
        if health is None:
            health = self._models[model] = _ModelHealth()
        return health

    def should_stream(self, model: str) -> bool:
        health = self._models.get(model)
        if health is None or health.cooldown_until is None:
            return True
        return self._clock() >= health.cooldown_until

    def failure(self, model: str, cause: str, error_class: str | None) -> None:
        health = self.get(model)
        health.consecutive_failures += 1
        health.fallbacks += 1
        health.last_cause = cause
        health.last_error_class = error_class
        if health.consecutive_failures >= self._threshold or cause == "stream_rejected":
            health.cooldown_until = self._clock() + self._cooldown
            log.warning(
                "streaming disabled for model=%s for %.0fs after %d consecutive failures (last: %s)",
                model,
                self._cooldown,
                health.consecutive_failures,
                cause,
            )

    def success(self, model: str) -> None:
        health = self._models.get(model)
        if health is not None:
            health.consecutive_failures = 0
            health.cooldown_until = None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for model, h in self._models.items():
            cooling = h.cooldown_until is not None and now < h.cooldown_until
            out[model] = {
                "streaming": "cooldown" if cooling else "ok",
                "cooldown_remaining": round(h.cooldown_until - now, 1) if cooling and h.cooldown_until else 0.0,
                "consecutive_failures": h.consecutive_failures,
                "fallbacks": h.fallbacks,
                "last_error": h.last_cause,
                "last_error_class": h.last_error_class,
                "stream_options": h.stream_options_ok,
            }
        return out


# ---------------------------------------------------------------------------
# Error classification


def _scrub(text: str, secret: str) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def _body_field(exc: Any, name: str) -> Any:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        if name in body:
            return body[name]
        inner = body.get("error")
        if isinstance(inner, dict):
            return inner.get(name)
    return None


def _provider_message(exc: BaseException) -> str:
    message = _body_field(exc, "message")
    if isinstance(message, str) and message:
        return message
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers if exc.response is not None else {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


def _disguised_disconnect(exc: BaseException) -> bool:
    """True for a "timeout" that is really a refused or dropped connection.

    The SDK's aiohttp transport (`openai.DefaultAioHttpClient`) names every
    `aiohttp.ClientConnectionError` it has no better name for -- a refused connection, a
    server that hung up -- `httpx2.ConnectTimeout`. Its cause chain still tells the truth.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


def _refuses_images(exc: BaseException) -> bool:
    """A 4xx to a request with images that says the model cannot take images at all."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in _VISION_STATUSES:
        return False
    if _body_field(exc, "code") == "model_not_found":
        return False
    message = _provider_message(exc)
    return bool(_VISION_RE.search(message)) and not _BAD_IMAGE_RE.search(message)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from (`__cause__`, else `__context__`), down to the root.

    `__context__` is followed even when suppressed (`raise ... from None`): httpcore hides
    the `ConnectionRefusedError` under "All connection attempts failed" that way.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under the SDK's and the transport's wrappers.

    "Request timed out." (the SDK's `APITimeoutError`) over `httpx2.ConnectTimeout` over
    aiohttp's `ClientConnectorError` over `ConnectionRefusedError`: only the last one is
    true, and the one an operator can act on.
    """
    *_, root = _chain(exc)
    return root


# What a root cause means, in the words a person would use (checked in order: subclasses first).
_ROOT_WORDS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset"),
    (ConnectionAbortedError, "connection aborted"),
    (socket.gaierror, "host name not found"),
    (ssl.SSLCertVerificationError, "TLS certificate not trusted"),
    (ssl.SSLError, "TLS error"),
    (TimeoutError, "timed out"),
)


def _root_text(root: BaseException) -> str:
    text = str(root).strip()
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _connect_failed(exc: BaseException) -> bool:
    """True when no connection was made at all (refused, unknown host, TLS handshake)."""
    for link in _chain(exc):
        if isinstance(link, (aiohttp.ClientConnectorError, httpx2.ConnectError)):
            return True
        if isinstance(link, (ConnectionRefusedError, socket.gaierror, ssl.SSLError)):
            return True
    return False


def _transport_failure(exc: BaseException, api_key: str) -> tuple[str, str]:
    """(what happened, root cause class) for a connection-level failure, key scrubbed.

    `couldn't connect to the provider: connection refused (ConnectionRefusedError: [Errno
    111] Connect call failed ('127.0.0.1', 9))`, or `the connection to the provider broke:
    ...` when it failed after connecting.
    """
    root = _root_cause(exc)
    words = next((w for kind, w in _ROOT_WORDS if isinstance(root, kind)), None)
    detail = _scrub(_root_text(root), api_key)
    what = "couldn't connect to the provider" if _connect_failed(exc) else "the connection to the provider broke"
    return (f"{what}: {words} ({detail})" if words else f"{what} ({detail})"), type(root).__name__


def provider_host(base_url: str) -> str:
    """`host[:port]` of a provider URL: how logs name the provider (no userinfo, path or query)."""
    parts = urlsplit(base_url)
    host = parts.hostname or base_url
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def to_provider_error(exc: BaseException, api_key: str = "", *, images: bool = False) -> ProviderError:
    """Map an SDK (or watchdog) exception to the agent's typed hierarchy, scrubbing the key.

    Transport failures are classified and described by their root cause, not by the
    SDK's wrapper: the aiohttp transport reports a refused connection as
    `APITimeoutError("Request timed out.")`, which is a `ProviderUnavailable` ("couldn't
    connect ... connection refused"), never a `ProviderTimeout`.

    `images`: the request carried image parts, so a 4xx naming images means the model
    cannot see (`ProviderNoVision`) rather than a generic bad request.
    """
    if isinstance(exc, ProviderError):
        return exc
    message = _scrub(_provider_message(exc), api_key)
    code = _body_field(exc, "code")
    code = str(code) if code is not None else None
    if isinstance(exc, _WatchdogTimeout):
        return ProviderTimeout(f"provider request timed out ({exc.cause})", code=exc.cause)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        text = f"provider returned HTTP {status}: {message}"
        kwargs: dict[str, Any] = {"status_code": status, "code": code, "provider_message": message}
        if status in (401, 403):
            return ProviderAuthError(text, **kwargs)
        if status == 429:
            return ProviderRateLimited(text, retry_after=_retry_after(exc), **kwargs)
        if status in (408, 504):
            return ProviderTimeout(text, **kwargs)
        if status >= 500:
            return ProviderServerError(text, **kwargs)
        if images and _refuses_images(exc):
            return ProviderNoVision(text, **kwargs)
        return ProviderBadRequest(text, **kwargs)
    if isinstance(exc, openai.APITimeoutError) and not _disguised_disconnect(exc):
        detail = _scrub(_root_text(_root_cause(exc)), api_key)
        return ProviderTimeout(f"provider request timed out ({detail})", provider_message=detail,
                               cause=type(_root_cause(exc)).__name__)
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientConnectionError):
        return ProviderTimeout(f"provider request timed out ({_scrub(_root_text(exc), api_key)})", cause=type(exc).__name__)
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError, aiohttp.ClientConnectionError, OSError)):
        what, root = _transport_failure(exc, api_key)
        return ProviderUnavailable(what, provider_message=what, cause=root)
    if isinstance(exc, openai.APIError):  # an error the provider reported inside a 200 response
        return ProviderServerError(f"provider reported an error: {message}", code=code, provider_message=message)
    return ProviderBadResponse(f"unusable provider response ({type(exc).__name__}: {message})", provider_message=message)


def _failure_detail(exc: BaseException) -> str:
    """What broke a stream, for the INFO line: transport failures by their root cause (the
    SDK's wrapper may be `APITimeoutError` "Request timed out." over a refused connection)."""
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)):
        return _root_text(_root_cause(exc))
    return f"{type(exc).__name__}: {_provider_message(exc)}"


def _is_terminal_status(exc: BaseException, *, images: bool = False) -> bool:
    """Errors a non-streaming retry cannot fix: raise them instead of falling back."""
    if isinstance(exc, (openai.AuthenticationError, openai.NotFoundError, openai.RateLimitError)):
        return True
    if images and _refuses_images(exc):
        return True  # the same images, non-streaming, are refused the same way
    if isinstance(exc, openai.PermissionDeniedError):
        return not _STREAM_RE.search(_provider_message(exc))
    return False


def _provider_down(cause: str) -> bool:
    """A streaming failure that says the provider is unavailable, not that streaming is."""
    return cause in ("connect_failed", "connect_timeout", "first_token_timeout", "http_429") or cause.startswith("http_5")


def _stream_cause(exc: BaseException, acc: Any) -> str:
    """Short machine-readable cause for a streaming failure (used in logs and TurnResult).

    Before the body, failures are the SDK's (`APIStatusError`, `APITimeoutError`,
    `APIConnectionError`); while the body is read they are `httpx2`'s own, since the
    body is read without the SDK's stream wrapper.
    """
    if isinstance(exc, openai.APIStatusError):
        message = _provider_message(exc)
        param = _body_field(exc, "param")
        if param == "stream_options" or _STREAM_OPTIONS_RE.search(message):
            return "stream_options_rejected"
        if param == "stream" or _STREAM_RE.search(message):
            return "stream_rejected"
        return f"http_{exc.status_code}"
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)) and _connect_failed(exc):
        return "connect_failed"
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)) and _disguised_disconnect(exc):
        return "connection_dropped"
    if isinstance(exc, openai.APITimeoutError):
        if isinstance(exc.__cause__, httpx2.ConnectTimeout):
            return "connect_timeout"
        return "idle_timeout" if acc is not None and acc.chunks else "first_token_timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection_dropped"
    if isinstance(exc, openai.APIError):
        return "in_band_error"
    if isinstance(exc, httpx2.TimeoutException):  # the byte-level read timeout, mid-body
        return "idle_timeout" if acc is not None and acc.chunks else "first_token_timeout"
    if isinstance(exc, httpx2.DecodingError):  # a broken gzip/deflate body
        return "malformed_chunk"
    if isinstance(exc, httpx2.TransportError):  # RemoteProtocolError, ReadError, ...
        return "connection_dropped"
    if isinstance(exc, (ValueError, TypeError, AttributeError, IndexError, KeyError)):
        return "malformed_chunk"  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    return "stream_error"


_DONE = b"[DONE]"
_DRAIN_SECONDS = 0.1  # after [DONE]: read the rest of the body so the connection can be reused


async def _drain(response: httpx2.Response, chunks: AsyncIterator[bytes]) -> None:
    """Consume what follows `[DONE]` (usually just the end of the chunked body), briefly."""
    if response.is_closed or response.http_version != "HTTP/1.1":
        return
    with contextlib.suppress(TimeoutError, httpx2.HTTPError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in chunks:
                pass


# ---------------------------------------------------------------------------
# Request shapes


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _responses_parts(content: Any, role: str) -> Any:
    if not isinstance(content, list):
        return _text_of(content)
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "output_text" if role == "assistant" else "input_text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        else:
            parts.append(part)
    return parts


def to_responses_input(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Chat Completions history → Responses `instructions` + `input` items.

    System/developer messages become the instructions; assistant tool calls become
    `function_call` items and tool messages `function_call_output` items.
    """
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text = _text_of(content)
            if text:
                instructions.append(text)
        elif role == "user":
            items.append({"role": "user", "content": _responses_parts(content, "user")})
        elif role == "assistant":
            if content:
                items.append({"role": "assistant", "content": _text_of(content)})
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id"),
                        "name": function.get("name", ""),
                        "arguments": function.get("arguments", ""),
                    }
                )
        elif role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"), "output": _text_of(content)})
    return ("\n\n".join(instructions) or None), items


# ---------------------------------------------------------------------------
# Reading a streamed body


class _BodyReader:
    """Reads one SSE body into an accumulator: the per-token hot path.

    Per network read: one `SSEDecoder.feed`, one clock read for the idle watchdog. Per
    event: a first-byte check, `json.loads` into a dict, one `error` lookup, the
    accumulator's `feed`. No task, no `wait_for` and no object beyond the dict per chunk.
    `[DONE]` ends Chat Completions (and is tolerated after a Responses terminal event);
    otherwise the body ends at EOF.
    """

    __slots__ = ("acc", "cut", "done", "watchdog")

    def __init__(self, acc: ChatAccumulator | ResponsesAccumulator, watchdog: _Watchdog) -> None:
        self.acc = acc
        self.watchdog = watchdog
        self.done = False  # saw [DONE]
        self.cut = False  # the body ended inside an event (no blank line after it)

    async def read(self, http: httpx2.Response) -> None:
        encoding = http.headers.get("content-encoding", "").lower()
        # Without a content encoding, skip httpx2's decoder layers (one generator per read).
        source = http.aiter_raw() if encoding in ("", "identity") else http.aiter_bytes()
        decoder = SSEDecoder()
        decode = decoder.feed
        loads = json.loads
        feed = self.acc.feed
        watchdog = self.watchdog
        now = asyncio.get_running_loop().time
        async with contextlib.aclosing(source) as chunks:
            async for raw in chunks:
                events = decode(raw)
                if not events:
                    continue
                watchdog.last = now()
                for event, data in events:
                    if data[0] != 123:  # not "{"
                        if data.startswith(_DONE):
                            self.done = True
                            break
                        if data[0] == 58:  # ":" -- a keepalive comment a proxy re-wrapped as data
                            continue
                    obj = loads(data)
                    if event == "error" or obj.get("error"):
                        raise in_band_error(obj)
                    feed(obj)
                if self.done:
                    await _drain(http, chunks)
                    return
            self.cut = decoder.close()


def _answer_from_body(body: bytes, responses: bool) -> ModelResponse:
    """A JSON body that answered a stream request: the complete answer, or the provider's error."""
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise StreamBroken("malformed_chunk", f"a JSON body that does not parse: {exc}") from exc
    if isinstance(obj, dict) and (obj.get("error") or obj.get("status") == "failed"):
        raise in_band_error(obj)
    try:
        return response_from_responses(obj) if responses else response_from_chat_completion(obj)
    except (ProviderBadResponse, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise StreamBroken("malformed_chunk", f"an unusable JSON body ({type(exc).__name__}: {exc})") from exc


def _emit_whole(response: ModelResponse, callbacks: tuple[Callable[..., None], ...]) -> None:
    """Report a whole answer through the stream's callbacks, as one delta of each kind."""
    on_text, on_reasoning, on_first = callbacks
    on_first()
    if response.reasoning:
        on_reasoning(response.reasoning)
    if response.visible_text:
        on_text(response.visible_text)


# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What `Provider.probe` learned about the models parley is configured to use.

    Facts only; `parley check` decides what they are worth: a model missing from the
    listing fails (every turn with it would end in "model not found"), no listing at all
    is a warning (nothing could be verified but the first model's answer).

    `models`: the models asked about, the default first. `listed`: the ids `GET /models`
    returned, or None when it gave none -- then `models_status` is its HTTP status (200:
    an empty list) and `models[0]` answered a 1-token request instead. `missing`: the
    models the listing lacks (empty when there was no listing to compare with).
    """

    models: tuple[str, ...]
    listed: tuple[str, ...] | None
    missing: tuple[str, ...]
    models_status: int | None = None

    @property
    def verified(self) -> bool:
        """Whether the listing could confirm every model (False: no listing, or some missing)."""
        return self.listed is not None and not self.missing

    def __str__(self) -> str:
        if self.listed is None:
            if self.models_status == 200:
                why = "GET /models lists no models"
            elif self.models_status in (404, 405, 501):
                why = f"the provider has no /models endpoint (GET /models answered {self.models_status})"
            else:
                why = f"GET /models failed ({self.models_status})"
            text = f"{why}, so which models it serves is unknown; {self.models[0]} answered a 1-token request"
            unchecked = self.models[1:]
            return text + (f"; not checked: {', '.join(unchecked)}" if unchecked else "")
        count = f"{len(self.listed)} model{'s' if len(self.listed) != 1 else ''}"
        if not self.missing:
            return f"{', '.join(self.models)} among the {count} GET /models lists"
        shown = ", ".join(self.listed[:5]) + (f", … {len(self.listed) - 5} more" if len(self.listed) > 5 else "")
        verb = "is" if len(self.missing) == 1 else "are"
        return f"{', '.join(self.missing)} {verb} not among the {count} GET /models lists ({shown})"


def _is_listed(model: str, listed: Sequence[str]) -> bool:
    """Whether `model` is served per the listing. Ollama lists `llama3.2:latest` and serves
    it as `llama3.2` too, so an untagged name matches its `:latest`."""
    return model in listed or (":" not in model and f"{model}:latest" in listed)


class Provider:
    """The agent's only door to the model: `complete()` one step, streaming when it pays off."""

    def __init__(
        self,
        cfg: ProviderConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        http_client: httpx2.AsyncClient | None = None,
        on_request: RequestObserver | None = None,
    ) -> None:
        """`on_request` hears of every HTTP request sent (see `RequestObserver`)."""
        self.cfg = cfg
        t = cfg.timeouts
        # Transport timeouts back parley's clocks up and never decide (module docstring).
        self._stream_timeout = openai.Timeout(t.transport_total, connect=t.connect, read=t.transport_read(stream=True))
        self._plain_timeout = openai.Timeout(t.transport_total, connect=t.connect, read=t.transport_read(stream=False))
        self._on_request = on_request
        hooks = {"request": [self._sent]}
        if http_client is None:
            # aiohttp: the SDK's own aiohttp-backed httpx2 client -- same requests, retries
            # and errors, but aiohttp's C parser reads each network read of a stream for
            # about half the CPU of httpcore2 + h11 (BENCHMARKS.md, "Where the CPU goes").
            # httpx: the client the SDK would build itself, plus the request hook.
            factory = openai.DefaultAioHttpClient if cfg.transport == "aiohttp" else openai.DefaultAsyncHttpxClient
            http_client = factory(timeout=self._plain_timeout, event_hooks=hooks)
        else:
            http_client.event_hooks["request"].append(self._sent)
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            max_retries=cfg.max_retries,
            timeout=self._plain_timeout,
            http_client=http_client,
            default_headers=dict(cfg.headers) or None,
        )
        self.health = StreamHealth(cfg.stream_failure_threshold, cfg.stream_cooldown, clock)
        self.host = provider_host(cfg.base_url)

    async def aclose(self) -> None:
        await self._client.close()

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client every request goes through (shared by transcription)."""
        return self._client

    async def _sent(self, request: httpx2.Request) -> None:
        """The transport's request hook: one HTTP request is leaving (SDK retries too)."""
        if self._on_request is None:
            return
        kind, attempt = _CALL.get()
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            attempt = "retry"
        try:
            self._on_request(kind, attempt)
        except Exception:
            log.exception("the provider request observer raised; ignored")

    # -- one step ---------------------------------------------------------

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        model: str,
        events: TurnEvents | None,
        step: StepState,
        fail_fast: bool = False,
    ) -> ModelResponse:
        """Run one model call; stream when `events.wants_deltas`, fall back when streaming breaks.

        A `ProviderError` leaving here names the provider's host and the model, so the
        line that reports it says where it failed.

        `fail_fast`: another model waits in the chain. A stream that failed because the
        provider is down -- no connection, 5xx, 429, no first token in time -- before it
        showed anything then raises at once, instead of asking this provider again
        without streaming (which would fail the same way, only later).
        """
        try:
            return await self._complete(messages, tools, model=model, events=events, step=step, fail_fast=fail_fast)
        except ProviderError as exc:
            raise self._located(exc, model)

    def _located(self, exc: ProviderError, model: str) -> ProviderError:
        """Fill in which provider and model a failed request was for (if not already)."""
        if exc.provider is None:
            exc.provider = self.host
        if exc.model is None:
            exc.model = model
        return exc

    async def _complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        *,
        model: str,
        events: TurnEvents | None,
        step: StepState,
        fail_fast: bool = False,
    ) -> ModelResponse:
        step.started_at = asyncio.get_running_loop().time()
        images = has_images(messages)
        if events is None or not events.wants_deltas or not self.cfg.stream:
            response = await self._request(messages, tools, model, attempt="first", images=images)
            self._first_delta(step, events)
            return response

        health = self.health.get(model)
        if not self.health.should_stream(model):
            cause, detail = "cooldown", ""
        else:
            try:
                response = await self._stream(
                    messages, tools, model, events, step, health.stream_options_ok, images=images
                )
            except StreamBroken as broken:
                cause, detail = broken.cause, broken.detail
                if fail_fast and _provider_down(cause) and broken.__cause__ is not None and not step.visible_text:
                    raise to_provider_error(broken.__cause__, self.cfg.api_key, images=images) from broken
                if cause == "stream_options_rejected":
                    health.stream_options_ok = False  # stream without it next time (§7.4.2)
                    health.fallbacks += 1
                    health.last_cause = cause
                else:
                    error_class = type(broken.__cause__).__name__ if broken.__cause__ is not None else None
                    self.health.failure(model, cause, error_class)
            else:
                self.health.success(model)
                return response

        log.info(
            "streaming from model=%s failed (%s%s); answering this step with a non-streaming request",
            model,
            cause,
            f": {_scrub(detail, self.cfg.api_key)}" if detail else "",
        )
        response = await self._request(messages, tools, model, attempt="fallback", images=images)
        response.fell_back = True
        response.fallback_cause = cause
        self._first_delta(step, events)
        _guard(events.on_fallback, "on_fallback")(response.visible_text)
        return response

    @staticmethod
    def _first_delta(step: StepState, events: TurnEvents | None) -> None:
        if step.first_fired:
            return
        step.first_fired = True
        step.first_delta_at = asyncio.get_running_loop().time()
        if events is not None:
            _guard(events.on_first_delta, "on_first_delta")()

    # -- request building ---------------------------------------------------

    def _kwargs(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, model: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": model}
        if self.cfg.api == "responses":
            instructions, items = to_responses_input(messages)
            kwargs["input"] = items
            if instructions:
                kwargs["instructions"] = instructions
        else:
            kwargs["messages"] = messages
        if tools:
            kwargs["tools"] = tools
        if self.cfg.extra_params:
            kwargs["extra_body"] = dict(self.cfg.extra_params)
        return kwargs

    # -- non-streaming ------------------------------------------------------

    async def _request(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        model: str,
        *,
        attempt: str,
        images: bool = False,
    ) -> ModelResponse:
        """One non-streaming request; `attempt` is "first", or "fallback" after a broken stream."""
        kwargs = self._kwargs(messages, tools, model)
        t = self.cfg.timeouts
        try:
            with _calling("request", attempt), _Watchdog(None, first_token=None, idle=None, total=t.total):
                if self.cfg.api == "responses":
                    raw = await self._client.responses.create(**kwargs, timeout=self._plain_timeout)
                    return response_from_responses(raw)
                raw = await self._client.chat.completions.create(**kwargs, timeout=self._plain_timeout)
                return response_from_chat_completion(raw)
        except ProviderError:
            raise
        except Exception as exc:
            raise to_provider_error(exc, self.cfg.api_key, images=images) from exc

    # -- streaming ----------------------------------------------------------

    async def _stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        model: str,
        events: TurnEvents,
        step: StepState,
        stream_options: bool,
        *,
        images: bool = False,
    ) -> ModelResponse:
        """One streaming request: the SDK sends it (auth, retries, typed status errors before
        the body), we read the body -- SSE through `SSEDecoder` + `json.loads` into the
        dict accumulators, or a JSON body as the complete answer."""
        loop = asyncio.get_running_loop()

        def on_first() -> None:
            step.first_fired = True
            step.first_delta_at = loop.time()
            watchdog.rearm()
            first_cb()

        first_cb = _guard(events.on_first_delta, "on_first_delta")
        callbacks = (_guard(events.on_text, "on_text"), _guard(events.on_reasoning, "on_reasoning"), on_first)
        responses = self.cfg.api == "responses"
        acc: ChatAccumulator | ResponsesAccumulator = ResponsesAccumulator(*callbacks) if responses else ChatAccumulator(*callbacks)
        step.acc = acc
        kwargs = self._kwargs(messages, tools, model)
        if not responses and stream_options:
            kwargs["stream_options"] = {"include_usage": True}
        t = self.cfg.timeouts
        watchdog = _Watchdog(acc, first_token=t.first_token, idle=t.idle, total=t.total)
        reader = _BodyReader(acc, watchdog)
        try:
            with _calling("stream"), watchdog:
                if responses:
                    opener = self._client.responses.with_streaming_response.create(
                        **kwargs, stream=True, timeout=self._stream_timeout
                    )
                else:
                    opener = self._client.chat.completions.with_streaming_response.create(
                        **kwargs, stream=True, timeout=self._stream_timeout
                    )
                async with opener as raw:
                    http = raw.http_response
                    if http.headers.get("content-type", "").lower().startswith("application/json"):
                        # A relay that ignored `stream` (or an error body): one complete answer.
                        body = await http.aread()
                        response = _answer_from_body(body, responses)
                        _emit_whole(response, callbacks)
                        if response.model is None:
                            response.model = model
                        log.debug("model=%s answered a stream request with a JSON body; used it whole", model)
                        return response
                    await reader.read(http)
        except StreamBroken:
            raise
        except _WatchdogTimeout as exc:
            if not reader.done:  # a deadline during the brief drain after [DONE] changes nothing
                raise StreamBroken(exc.cause) from exc
        except Exception as exc:
            if _is_terminal_status(exc, images=images):
                raise to_provider_error(exc, self.cfg.api_key, images=images) from exc
            raise StreamBroken(_stream_cause(exc, acc), _failure_detail(exc)) from exc
        if not acc.chunks:
            if reader.cut:
                raise StreamBroken("truncated", "the body ended inside an event, before any chunk")
            raise StreamBroken("empty_stream", "the stream ended without a single chunk")
        if not acc.has_finish:
            where = " (inside an unterminated event)" if reader.cut else ""
            raise StreamBroken("truncated", f"the stream ended after {acc.chunks} chunks without a finish reason{where}")
        response = acc.result()
        if response.finish_reason == "error":
            raise StreamBroken("in_band_error", "finish_reason=error")
        if response.model is None:
            response.model = model
        return response

    # -- operator helpers ---------------------------------------------------

    async def probe(self, models: Sequence[str] = ()) -> ProbeResult:
        """Reach the provider and ask which of `models` (default: the configured one) it serves.

        `GET /models` answers without spending a token. A provider without it (many local
        servers) gets one 1-token request for the first model instead, which proves the key
        and that model but says nothing about the others -- the result says so, and
        `parley check` warns. Raises `ProviderError` when the provider cannot be reached,
        refuses the key, or refuses the model.
        """
        wanted = tuple(dict.fromkeys(models or (self.cfg.model,)))
        model = wanted[0]
        try:
            with _calling("probe"), _Watchdog(None, first_token=None, idle=None, total=self.cfg.timeouts.total):
                try:
                    page = await self._client.models.list()
                    listed = tuple(m.id for m in page.data)
                    if listed:
                        missing = tuple(m for m in wanted if not _is_listed(m, listed))
                        return ProbeResult(wanted, listed, missing)
                    log.info("GET /models listed no models; probing with a 1-token request")
                    status: int | None = 200
                except openai.APIStatusError as exc:
                    if exc.status_code in (401, 403, 429):
                        raise
                    # Many OpenAI-compatible servers have no /models: try the model itself.
                    log.info("GET /models failed (%s); probing with a 1-token request", exc.status_code)
                    status = exc.status_code
                if self.cfg.api == "responses":
                    await self._client.responses.create(model=model, input="ping", max_output_tokens=16)
                else:
                    await self._client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1
                    )
                return ProbeResult(wanted, None, (), models_status=status)
        except ProviderError as exc:
            raise self._located(exc, model)
        except Exception as exc:
            raise self._located(to_provider_error(exc, self.cfg.api_key), model) from exc

    def health_snapshot(self) -> dict[str, Any]:
        return {
            "base_url": self.cfg.base_url,
            "api": self.cfg.api,
            "streaming_enabled": self.cfg.stream,
            "models": self.health.snapshot(),
        }
