"""Provider configuration for the agent: plain dataclasses, no I/O.

`bots/config.py` parses YAML/env into these; `agent/` never imports `bots/`, so the
agent stays usable (and testable) without any chat platform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ApiMode = Literal["chat_completions", "responses"]
API_MODES: tuple[str, ...] = ("chat_completions", "responses")
Transport = Literal["aiohttp", "httpx"]
TRANSPORTS: tuple[str, ...] = ("aiohttp", "httpx")


@dataclass(slots=True)
class Timeouts:
    """Separate clocks for one model call (seconds; `None` disables a clock).

    - `connect`: TCP/TLS connect. Keep it below `first_token`: a connect that failed is
      the one failure the SDK may retry inside the first-token window (nothing reached
      the provider, so nothing is billed twice).
    - `first_token`: request start → first content-bearing delta (text, reasoning or
      tool call). It is *the* first-byte clock: late response headers, a queue that only
      sends `: PROCESSING` comments and a model that thinks silently all run against it.
    - `idle`: between two stream chunks after the first delta (event level).
    - `total`: wall clock for one request (streaming or not). The SDK has none.

    parley's own watchdog enforces all four; the transport underneath (httpx/aiohttp,
    driven by the SDK) only gets `transport_read` and `transport_total`, which are
    always *later* than every clock above. So the SDK never gives up on a request --
    and resends it, which bills it twice -- while parley would still have waited for it.

    Defaults are sized for a person waiting in a chat: a hung provider ends the turn
    with an error after about `first_token + total` (the streaming attempt, then the
    one non-streaming fallback), about 4 minutes, while the live message has said
    "still working…" since early on; 45 s to a first token still covers reasoning
    models that stream their thinking.
    """

    connect: float | None = 10.0
    first_token: float | None = 45.0
    idle: float | None = 30.0
    total: float | None = 180.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_token", "idle", "total"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Timeouts.{name} must be > 0 or None, got {value!r}")

    def transport_read(self, *, stream: bool) -> float | None:
        """The byte-level read timeout to hand the transport: a backstop, never a decider.

        Streaming: later than both `first_token` (the wait for headers is a read) and
        `idle`; with the first-token clock off, none (only `total` bounds the wait for
        the first byte -- `idle` must not stand in for it). Non-streaming: the whole
        answer comes with the headers, so later than `total`.
        """
        if not stream:
            return _later_than(self.total)
        if self.first_token is None:
            return None
        return _later_than(max(self.first_token, self.idle or 0.0))

    @property
    def transport_total(self) -> float | None:
        """Write and pool timeouts for the transport: later than `total`, never deciding."""
        return _later_than(self.total)


TRANSPORT_GRACE = 5.0
"""Seconds a transport timeout is set beyond the parley clock it backs up (see `Timeouts`)."""


def _later_than(clock: float | None) -> float | None:
    return None if clock is None else clock + TRANSPORT_GRACE


@dataclass(slots=True)
class ProviderConfig:
    """One OpenAI-compatible provider endpoint and how to talk to it.

    `stream=False` never streams (every step is one non-streaming request).
    After `stream_failure_threshold` consecutive streaming failures for the same
    base_url+model, streaming is skipped for `stream_cooldown` seconds; the next
    streaming attempt after the cooldown is a probe (fail → cooldown again).
    `extra_params` are merged into every request body (e.g. temperature, reasoning).

    `transport` is the HTTP client under the openai SDK: "aiohttp" (default; the SDK's
    `DefaultAioHttpClient`, whose C HTTP parser reads a streamed body for about half the
    CPU per network read) or "httpx" (the SDK's own httpx2/httpcore2 stack, for HTTP/2 or
    anything aiohttp does not handle). Either way the SDK builds, sends and retries the
    requests and parley reads streamed bodies itself (BENCHMARKS.md).
    """

    base_url: str
    api_key: str
    model: str
    api: ApiMode = "chat_completions"
    extra_params: dict[str, Any] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_retries: int = 2
    stream: bool = True
    stream_failure_threshold: int = 3
    stream_cooldown: float = 300.0
    transport: Transport = "aiohttp"
    headers: dict[str, str] = field(default_factory=dict)  # extra HTTP headers on every request (secrets)

    def __post_init__(self) -> None:
        if self.api not in API_MODES:
            raise ValueError(f"ProviderConfig.api must be one of {API_MODES}, got {self.api!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"ProviderConfig.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if not self.model:
            raise ValueError("ProviderConfig.model must not be empty")
        if self.max_retries < 0:
            raise ValueError("ProviderConfig.max_retries must be >= 0")
        if self.stream_failure_threshold < 1:
            raise ValueError("ProviderConfig.stream_failure_threshold must be >= 1")
        if self.stream_cooldown < 0:
            raise ValueError("ProviderConfig.stream_cooldown must be >= 0")

    def __repr__(self) -> str:  # never print the API key
        return (
            f"ProviderConfig(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r}, "
            f"stream={self.stream}, timeouts={self.timeouts!r}, max_retries={self.max_retries}, "
            f"transport={self.transport!r})"
        )
