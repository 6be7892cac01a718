"""MCP servers as tools, through the official `mcp` SDK (client side).

- `McpServerConfig`: one server from config `tools.mcp_servers` -- stdio (`command`,
  `args`, `env`, `cwd`) or streamable HTTP (`url`, `headers`). `env`/`headers` values are
  already resolved from environment references by the config layer; they are secrets
  and never appear in a log line, a status or an exception text.
- `McpServers(configs, registry)`: `start()` connects every server in the background
  (never raises, never blocks `parley run` for longer than it takes to spawn tasks);
  each ready server's tools are added to `registry` as `<server>__<tool>` (names made
  safe for the model: [A-Za-z0-9_-], at most 64 characters), withdrawn when it dies or
  hangs, re-listed on `notifications/tools/list_changed`; a failed server is restarted
  with back-off and reported once per failure streak in the log. `status()` gives a
  `McpServerStatus` per server for `/status` and `/readyz` details; `check()` connects
  each once and lists its tools, for `parley check`. `aclose()` stops everything.

How it works, and why:

- **One supervisor task per server** owns that server's transport and `ClientSession`.
  The SDK's contexts are anyio task groups that must be entered and left by the same
  task, so they live there for the whole connection; tool calls come from the turns'
  tasks and only send requests on the session (the SDK correlates the replies).
- **Handshake**: the `initialize` handshake (protocol 2025-11-25), which every deployed
  server speaks and which keeps `ping` and spontaneous `tools/list_changed`.
- **Failure detection**: a stdio server that exits ends its output stream (noticed at
  once); an HTTP server that is gone fails the next request (the SDK tears the
  connection down). A server that stops answering is found by `ping`: after any call
  that timed out, and every `ping_interval` seconds while no call is in flight (a ping
  queued behind a big result would wrongly look unanswered); no answer within
  `ping_timeout` means it is restarted (a slow tool alone is just an error result).
- **Back-off**: `backoff_base` x 2^(n-1) seconds after the n-th failure in a row, at most
  `restart_max`. The count starts over once a server stayed ready `stable_after`
  seconds, so a server that crashes right after every start is not restarted every second.
- **Results** become text: text blocks joined by newlines; `structuredContent` as JSON
  only when there is no text (servers put the same data in a text block too, so
  appending would send it twice); images, audio and binary resources as a placeholder
  such as `[image: image/png, 12 KB]` (the model gets text only); embedded text
  resources as their text. `isError: true` raises `McpToolError` with the server's text,
  which the registry turns into an error result.
- **Environment of a stdio server**: the SDK's minimal set (HOME, LOGNAME, PATH, SHELL,
  TERM, USER) plus locale, time zone, temp dir and CA bundle variables (`_SAFE_ENV`),
  then the configured `env`. Nothing else of parley's environment (API tokens) leaks in.
  The child's stderr goes to parley's stderr (`errlog`).
- **Secrets**: configured `env` and header values and the URL's userinfo and query
  values are masked (`***`) in everything this module says (logs, statuses, errors)
  and in the records of the SDK's and httpx2's loggers, which log request URLs.
  `secret_values()` lists them for the application's own log redactor.
- The `mcp` SDK and `jsonschema` are imported on first use: `import agent` stays as
  fast without MCP servers as before.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TextIO
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import httpx2

from ..urls import url_without_secrets
from .registry import Tool, ToolRegistry

if TYPE_CHECKING:
    from mcp import ClientSession
    from mcp.types import CallToolResult

__all__ = [
    "McpServerConfig",
    "McpServerStatus",
    "McpServerUnavailable",
    "McpServers",
    "McpToolError",
    "secret_values",
]

log = logging.getLogger(__name__)

MAX_TOOL_NAME = 64  # what OpenAI-compatible APIs accept for a function name
MAX_HTTP_MESSAGE_BYTES = 32 * 1024 * 1024  # one SSE event; the SDK's 1 MiB default fails big results
_MAX_PAGES = 100  # tools/list pages followed; a cursor that never ends cannot hang startup
_ERROR_CHARS = 200  # an error in a status or a log line
_TOOL_ERROR_CHARS = 2000  # a tool's error text for the model
_MIN_SECRET_LEN = 4  # shorter values are masked nowhere: "1" or "yes" are not secrets
_SAFE_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR")
_SDK_LOGGERS = ("httpx2", "client", "mcp.client.stdio", "mcp.client.streamable_http", "mcp.shared.jsonrpc_dispatcher")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")
_VALID_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]+")

State = Literal["starting", "ready", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class McpServerConfig:
    """One MCP server parley connects to (config `tools.mcp_servers[]`)."""

    name: str  # [A-Za-z0-9_-]+; tools are offered as f"{name}__{tool}"
    command: str | None = None  # stdio: the program to start
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # secrets: values never logged
    cwd: str | None = None
    url: str | None = None  # streamable HTTP endpoint
    headers: dict[str, str] = field(default_factory=dict)  # secrets: values never logged
    call_timeout: float = 60.0  # seconds one tools/call may take
    startup_timeout: float = 20.0  # seconds to start + initialize + list tools
    restart_max: float = 300.0  # longest back-off between restarts, seconds

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command else "http"


@dataclass(frozen=True, slots=True)
class McpServerStatus:
    """What an operator sees of one server: no secrets, one short error line."""

    name: str
    transport: Literal["stdio", "http"]
    state: Literal["starting", "ready", "failed", "stopped"]
    tools: int = 0
    error: str | None = None  # the last failure, one redacted line
    restarts: int = 0
    retry_in: float | None = None  # seconds until the next attempt, while failed


class McpToolError(Exception):
    """A call to an MCP tool failed: the tool reported an error, timed out, or sent nothing usable."""


class McpServerUnavailable(McpToolError):
    """The tool's server is not connected right now (starting, failed or stopped)."""


class _Failure(Exception):
    """A connection attempt failed for a reason already worded for operators."""


# --------------------------------------------------------------------------- secrets


def _url_secrets(url: str) -> set[str]:
    parts = urlsplit(url)
    values = {parts.username or "", parts.password or "", parts.query}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        values.update((value, unquote(value)))
    return {v for v in values if v} | {unquote(v) for v in values if v}


def secret_values(configs: Iterable[McpServerConfig]) -> list[str]:
    """Every secret in `configs`, longest first: env and header values (and the credential
    after "Bearer "/"Basic "), URL userinfo and query values. For a log redactor."""
    values: set[str] = set()
    for config in configs:
        values.update(config.env.values())
        for value in config.headers.values():
            values.add(value)
            _, _, credential = value.strip().partition(" ")
            values.add(credential.strip())
        if config.url:
            values |= _url_secrets(config.url)
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


class _Redactor:
    """Masks known secret values in a text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern is not None else text


class _SdkLogRedaction(logging.Filter):
    """Masks MCP secrets in records of the SDK's and httpx2's own loggers.

    Those log the request URL (httpx2 at INFO, the SDK at DEBUG), and a URL may carry a
    token in its query. A logger filter runs before any handler, so whatever logging
    setup the application has, the secret is gone before a record is written.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: Counter[str] = Counter()
        self._redact = _Redactor(())

    def hold(self, secrets: Iterable[str], delta: int) -> None:
        for secret in secrets:
            self._counts[secret] += delta
        self._counts = Counter({k: v for k, v in self._counts.items() if v > 0})
        self._redact = _Redactor(self._counts)
        for name in _SDK_LOGGERS:
            logging.getLogger(name).addFilter(self)  # idempotent

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._counts:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error path
            return True
        masked = self._redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True


_SDK_LOG_REDACTION = _SdkLogRedaction()


# --------------------------------------------------------------------------- small helpers


def _one_line(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(base64_text: str) -> str:
    n = len(base64_text) * 3 // 4 - base64_text[-2:].count("=")
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.0f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MB"


def _safe_name(server: str, tool: str, taken: set[str] | dict[str, Any]) -> str:
    """`<server>__<tool>` as a function name the model APIs accept, unique among `taken`."""
    base = _UNSAFE_NAME.sub("_", f"{server}__{tool}")[:MAX_TOOL_NAME]
    name, n = base, 1
    while name in taken:
        n += 1
        suffix = f"_{n}"
        name = base[: MAX_TOOL_NAME - len(suffix)] + suffix
    return name


def _object_schema(raw: Any) -> tuple[dict[str, Any] | None, str]:
    """A copy of a tool's input schema usable as function parameters, or (None, why not).

    A schema that is not valid JSON Schema would make the provider reject every request
    that offers it -- every turn would fail -- so such a tool is skipped instead.
    """
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(raw, dict):
        return None, "its input schema is not a JSON object"
    schema = copy.deepcopy(raw)
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        return None, f"its input schema has type {schema['type']!r}, not 'object'"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return None, f"its input schema is not valid JSON Schema ({_one_line(exc.message, 120)})"
    return schema, ""


def _result_text(result: CallToolResult) -> str:
    """What the model reads of a tools/call result (see the module docstring)."""
    from mcp import types

    parts: list[str] = []
    has_text = False
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
            has_text = True
        elif isinstance(block, types.ImageContent):
            parts.append(f"[image: {block.mime_type}, {_size(block.data)}]")
        elif isinstance(block, types.AudioContent):
            parts.append(f"[audio: {block.mime_type}, {_size(block.data)}]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(resource.text)
                has_text = True
            else:
                mime = resource.mime_type or "application/octet-stream"
                parts.append(f"[resource: {resource.uri}, {mime}, {_size(resource.blob)}]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link: {block.name} {block.uri}]")
        else:
            parts.append(f"[{getattr(block, 'type', 'unknown')} content]")
    if result.structured_content is not None and not has_text:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return "\n".join(parts) if parts else "(no output)"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _list_tools(session: ClientSession) -> list[Any]:
    """Every tool the server offers, following pagination cursors."""
    from mcp import types

    tools: list[Any] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(_MAX_PAGES):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor or cursor in seen:
            break
        seen.add(cursor)
    return tools


class _WatchedReadStream:
    """The transport's read stream, telling its connection when it ends.

    A stdio server that exits closes its output; the SDK then just stops reading. This
    thin wrapper (the SDK's public `ReadStream` protocol) is how the supervisor learns
    of it at once, without waiting for a request to fail.
    """

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Link:
    """One connection to one server: what its supervisor and the tool calls share."""

    session: ClientSession | None = None  # set once initialized and listed
    phase: str = "start"  # start | initialize | tools/list | running: for error texts
    http_status: str | None = None  # the last HTTP error status seen, e.g. "HTTP 401 Unauthorized"
    lost: bool = False  # the transport's read stream ended
    relist: bool = False  # the server said its tools changed
    suspect: bool = False  # a call timed out: is the server still answering?
    calls: int = 0  # tools/call requests in flight
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def on_lost(self) -> None:
        self.lost = True
        self.wake.set()

    async def on_message(self, message: Any) -> None:
        """The session's message handler: never blocks (the read loop awaits it)."""
        from mcp import types

        if isinstance(message, types.ToolListChangedNotification):
            self.relist = True
            self.wake.set()
        elif isinstance(message, Exception):
            log.debug("MCP transport reported %s", type(message).__name__)


@dataclass(eq=False)
class _Server:
    config: McpServerConfig
    redact: _Redactor
    state: State = "stopped"
    error: str | None = None
    restarts: int = 0
    retry_at: float | None = None
    failing: bool = False  # in a failure streak whose start was logged
    stopping: bool = False  # aclose() asked a ready connection to close itself
    link: _Link | None = None
    names: dict[str, str] = field(default_factory=dict)  # server's tool name -> registry name (kept stable)
    offered: dict[str, Tool] = field(default_factory=dict)  # registry name -> the Tool we added
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ready or failed at least once
    scope: anyio.CancelScope | None = None
    task: asyncio.Task[None] | None = None


# --------------------------------------------------------------------------- the servers


class McpServers:
    """The configured MCP servers, supervised, their tools kept in a `ToolRegistry`.

    Keyword arguments tune failure handling (tests make them small): `backoff_base`,
    `stable_after`, `ping_interval`, `ping_timeout` (seconds, see the module docstring);
    `on_change(status)` is called whenever a server's state or tools change (it must not
    block); `errlog` receives stdio servers' stderr (default: `sys.stderr` at spawn).
    """

    def __init__(
        self,
        configs: Iterable[McpServerConfig],
        registry: ToolRegistry,
        *,
        backoff_base: float = 1.0,
        stable_after: float = 60.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        on_change: Callable[[McpServerStatus], None] | None = None,
        errlog: TextIO | None = None,
    ) -> None:
        self._servers: dict[str, _Server] = {}
        for config in configs:
            if not _VALID_SERVER_NAME.fullmatch(config.name):
                raise ValueError(f"MCP server name must be [A-Za-z0-9_-]+, got {config.name!r}")
            if config.name in self._servers:
                raise ValueError(f"two MCP servers are named {config.name!r}")
            if bool(config.command) == bool(config.url):
                raise ValueError(f"MCP server {config.name!r} needs exactly one of command (stdio) and url (http)")
            self._servers[config.name] = _Server(config, _Redactor(secret_values([config])))
        self._registry = registry
        self._backoff_base = backoff_base
        self._stable_after = stable_after
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_change = on_change
        self._errlog = errlog
        self._secrets = secret_values(s.config for s in self._servers.values())
        self._holding_secrets = False

    # ----------------------------------------------------------------- public

    async def start(self) -> None:
        """Start one supervisor task per server and return at once (never raises)."""
        self._hold_secrets()
        for s in self._servers.values():
            if s.task is None:
                s.scope = anyio.CancelScope()
                s.task = asyncio.create_task(self._supervise(s), name=f"mcp:{s.config.name}")

    async def ready(self, timeout: float | None = None) -> list[McpServerStatus]:
        """Wait until every server became ready or failed at least once (or `timeout`), then
        return the statuses. For `parley run` to report MCP at startup, and for tests."""
        try:
            async with asyncio.timeout(timeout):
                for s in self._servers.values():
                    if s.task is not None:  # not started: nothing to wait for
                        await s.settled.wait()
        except TimeoutError:
            pass
        return self.status()

    def status(self) -> list[McpServerStatus]:
        """One status per configured server, in configuration order."""
        return [self._status(s) for s in self._servers.values()]

    async def check(self) -> list[McpServerStatus]:
        """Connect to each server once (startup_timeout each, concurrently), list its tools,
        disconnect. Nothing is registered and nothing keeps running afterwards."""
        self._hold_secrets()
        try:
            return list(await asyncio.gather(*(self._check_one(s) for s in self._servers.values())))
        finally:
            if not any(s.task for s in self._servers.values()):
                self._release_secrets()

    async def aclose(self) -> None:
        """Stop every server: stdio children are terminated (the SDK closes stdin, then
        SIGTERM, then SIGKILL) and reaped; their tools leave the registry.

        A ready connection is asked to close itself first, so an HTTP server gets its
        session DELETE; one that is still connecting or waiting to retry is cancelled.
        """
        running = {s.task: s for s in self._servers.values() if s.task is not None and s.scope is not None}
        for s in running.values():
            s.stopping = True
            if s.link is not None and s.link.session is not None:
                s.link.wake.set()
            else:
                s.scope.cancel()  # type: ignore[union-attr]
        pending: set[asyncio.Task[None]] = set()
        if running:
            _, pending = await asyncio.wait(running, timeout=5.0)
            for task in pending:  # a polite close that takes too long: cancel it
                running[task].scope.cancel()  # type: ignore[union-attr]
            if pending:
                _, pending = await asyncio.wait(pending, timeout=30.0)
            for task in pending:  # cannot happen unless the SDK's bounded shutdown hangs
                log.warning("MCP server task %s did not stop in time; cancelling it", task.get_name())
                task.cancel()
        for s in self._servers.values():
            s.task = s.scope = None
            s.stopping = False
            self._withdraw(s)
            self._set(s, "stopped")
        self._release_secrets()

    # ----------------------------------------------------------------- supervision

    async def _supervise(self, s: _Server) -> None:
        """Connect, serve, and on failure withdraw the tools and retry with back-off."""
        cfg = s.config
        failures = 0
        assert s.scope is not None
        try:
            with s.scope:
                while True:
                    link = s.link = _Link()
                    self._set(s, "starting")
                    ready_at: float | None = None
                    try:
                        async with self._connect(s, link) as usable:
                            ready_at = time.monotonic()
                            self._publish(s, usable)
                            self._became_ready(s)
                            reason = await self._watch(s, link)
                    except Exception as exc:
                        reason = self._reason(s, link, exc)
                    if s.stopping:
                        return
                    s.link = None
                    withdrawn = len(s.offered)
                    self._withdraw(s)
                    if ready_at is not None and time.monotonic() - ready_at >= self._stable_after:
                        failures = 0
                    failures += 1
                    delay = min(cfg.restart_max, self._backoff_base * 2 ** (failures - 1))
                    s.error = s.redact(_one_line(reason, _ERROR_CHARS))
                    s.retry_at = time.monotonic() + delay
                    if not s.failing:
                        s.failing = True
                        tools = f"{withdrawn} tools withdrawn, " if withdrawn else ""
                        log.warning("MCP server %r failed: %s; %sretrying in %.3g s", cfg.name, s.error, tools, delay)
                    else:
                        log.debug("MCP server %r failed again: %s; retrying in %.3g s", cfg.name, s.error, delay)
                    self._set(s, "failed")
                    s.settled.set()
                    await anyio.sleep(delay)
                    s.restarts += 1
        finally:
            s.link = None
            self._withdraw(s)

    @asynccontextmanager
    async def _connect(self, s: _Server, link: _Link) -> AsyncIterator[list[tuple[str, str, dict[str, Any]]]]:
        """Start the transport, initialize, list the tools -- all within startup_timeout --
        and yield the usable tools with the session open on `link`."""
        from mcp import ClientSession, types

        cfg = s.config
        with anyio.CancelScope(deadline=anyio.current_time() + cfg.startup_timeout) as startup:
            async with self._transport(cfg, link) as (read, write):
                link.phase = "initialize"
                session = ClientSession(
                    _WatchedReadStream(read, link.on_lost),
                    write,
                    message_handler=link.on_message,
                    client_info=types.Implementation(name="parley", version="0.1.0"),
                )
                async with session:
                    await session.initialize()
                    link.phase = "tools/list"
                    usable = self._usable(s, await _list_tools(session))
                    startup.deadline = math.inf
                    link.phase = "running"
                    link.session = session
                    yield usable
        if startup.cancelled_caught:
            raise _Failure(f"{link.phase}: no answer within startup_timeout ({cfg.startup_timeout:g} s)")

    @asynccontextmanager
    async def _transport(self, cfg: McpServerConfig, link: _Link) -> AsyncIterator[tuple[Any, Any]]:
        from mcp import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        if cfg.command:
            env = {key: os.environ[key] for key in _SAFE_ENV if key in os.environ} | dict(cfg.env)
            params = StdioServerParameters(command=cfg.command, args=list(cfg.args), env=env, cwd=cfg.cwd)
            async with stdio_client(params, errlog=self._errlog or sys.stderr) as streams:
                yield streams
            return

        async def note_status(response: httpx2.Response) -> None:
            if response.status_code >= 400:
                link.http_status = f"HTTP {response.status_code} {response.reason_phrase}".strip()

        client = httpx2.AsyncClient(
            headers=dict(cfg.headers),
            timeout=httpx2.Timeout(30.0, read=300.0),  # the SDK's defaults; the SSE stream stays open
            event_hooks={"response": [note_status]},
        )
        async with client:
            assert cfg.url is not None
            async with streamable_http_client(
                cfg.url, http_client=client, max_sse_event_size=MAX_HTTP_MESSAGE_BYTES
            ) as streams:
                yield streams

    async def _watch(self, s: _Server, link: _Link) -> str:
        """Serve a ready connection until it is lost or stops answering; return why."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED

        assert link.session is not None
        cfg = s.config
        while True:
            link.wake.clear()
            if s.stopping:
                return "stopping"
            if link.lost:
                return "the server process exited" if cfg.command else "the connection closed"
            if link.relist:
                link.relist = False
                try:
                    with anyio.fail_after(cfg.startup_timeout):
                        tools = await _list_tools(link.session)
                except TimeoutError:
                    return f"no answer to tools/list within {cfg.startup_timeout:g} s"
                except MCPError as exc:
                    if exc.code == CONNECTION_CLOSED:
                        continue  # the stream's end is noticed above
                    self._relist_failed(s, exc.message)
                except Exception as exc:  # e.g. a listing the SDK finds invalid
                    self._relist_failed(s, f"{type(exc).__name__}: {exc}")
                else:
                    self._publish(s, self._usable(s, tools))
                continue
            if link.suspect:
                link.suspect = False
                if (why := await self._unresponsive(link)) is not None:
                    return f"{why} after a call timed out"
                continue
            with anyio.move_on_after(self._ping_interval) as idle:
                await link.wake.wait()
            # Only an idle server is pinged: a ping queued behind a big result would time out
            # while the server is busy answering, and busy calls have their own timeout.
            if idle.cancelled_caught and not link.calls and (why := await self._unresponsive(link)) is not None:
                return why

    def _relist_failed(self, s: _Server, why: str) -> None:
        reason = s.redact(_one_line(why, _ERROR_CHARS))
        log.warning("MCP server %r: re-listing its tools failed (%s); keeping the previous list", s.config.name, reason)

    async def _unresponsive(self, link: _Link) -> str | None:
        """None if the server answers a ping (an error answer is an answer), else why not."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED

        assert link.session is not None
        try:
            with anyio.fail_after(self._ping_timeout):
                await link.session.send_ping()
        except TimeoutError:
            return f"stopped answering (no reply to a ping within {self._ping_timeout:g} s)"
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                return "the connection closed"
        except Exception:  # an answer the SDK did not like is still an answer
            pass
        return None

    async def _check_one(self, s: _Server) -> McpServerStatus:
        link = _Link()
        try:
            async with self._connect(s, link) as usable:
                return McpServerStatus(s.config.name, s.config.transport, "ready", tools=len(usable))
        except Exception as exc:
            return McpServerStatus(s.config.name, s.config.transport, "failed", error=self._reason(s, link, exc))

    # ----------------------------------------------------------------- tools

    def _usable(self, s: _Server, tools: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """(server's name, description, parameters) of each tool the model can be offered."""
        usable: list[tuple[str, str, dict[str, Any]]] = []
        seen: set[str] = set()
        for t in tools:
            if t.name in seen:
                continue
            seen.add(t.name)
            schema, problem = _object_schema(t.input_schema)
            if schema is None:
                log.warning("MCP server %r: tool %r skipped: %s", s.config.name, t.name, problem)
                continue
            description = t.description or t.title or f"{t.name} (MCP server {s.config.name})"
            usable.append((t.name, description, schema))
        return usable

    def _publish(self, s: _Server, usable: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Make the registry hold exactly `usable` for this server: add new tools, replace
        changed ones, remove those gone. Names stay stable across re-lists and restarts."""
        registry = self._registry
        taken = {name for name in registry.names() if registry.get(name) is not s.offered.get(name)}
        fresh: dict[str, Tool] = {}
        for tool_name, description, schema in usable:
            exposed = s.names.get(tool_name)
            if exposed is None or exposed in taken or exposed in fresh:
                exposed = _safe_name(s.config.name, tool_name, taken | fresh.keys())
            s.names[tool_name] = exposed
            old = s.offered.get(exposed)
            if old is not None and old.description == description and old.parameters == schema:
                fresh[exposed] = old
            else:
                fresh[exposed] = Tool(
                    exposed,
                    description,
                    schema,
                    self._caller(s, tool_name),
                    timeout=s.config.call_timeout + 5.0,  # a backstop: the call itself times out first
                    source=f"mcp:{s.config.name}",
                )
        for exposed, tool in s.offered.items():
            if fresh.get(exposed) is not tool and registry.get(exposed) is tool:
                registry.remove(exposed)
        added = [tool for tool in fresh.values() if registry.get(tool.name) is not tool]
        for tool in added:
            registry.add(tool)
        if s.offered and (added or s.offered.keys() != fresh.keys()):
            log.info("MCP server %r: its tools changed (%d new or updated), now %d", s.config.name, len(added), len(fresh))
        s.offered = fresh
        self._changed(s)

    def _withdraw(self, s: _Server) -> None:
        for exposed, tool in s.offered.items():
            if self._registry.get(exposed) is tool:
                self._registry.remove(exposed)
        if s.offered:
            s.offered = {}
            self._changed(s)

    def _caller(self, s: _Server, tool_name: str) -> Callable[..., Any]:
        async def call(**arguments: Any) -> str:
            return await self._call(s, tool_name, arguments)

        return call

    async def _call(self, s: _Server, tool_name: str, arguments: dict[str, Any]) -> str:
        """tools/call on the current connection; the text for the model, or McpToolError."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        cfg = s.config
        link = s.link
        if link is None or link.session is None or s.state != "ready":
            raise McpServerUnavailable(f"MCP server {cfg.name!r} is not available right now")
        link.calls += 1
        try:
            result = await link.session.call_tool(tool_name, arguments, read_timeout_seconds=cfg.call_timeout)
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                link.suspect = True
                link.wake.set()
                raise McpToolError(f"MCP server {cfg.name!r} did not answer within {cfg.call_timeout:g} s") from None
            if exc.code == CONNECTION_CLOSED:
                link.wake.set()
                raise McpServerUnavailable(
                    f"MCP server {cfg.name!r} is not available right now (the connection was lost)"
                ) from None
            raise McpToolError(s.redact(_one_line(exc.message, _TOOL_ERROR_CHARS))) from None
        except Exception as exc:  # the SDK rejected the result (e.g. it breaks the tool's output schema)
            text = _one_line(f"{type(exc).__name__}: {exc}", _ERROR_CHARS)
            raise McpToolError(f"MCP server {cfg.name!r} sent an unusable result: {s.redact(text)}") from None
        finally:
            link.calls -= 1
        text = _result_text(result)
        if result.is_error:
            message = text.strip() if text != "(no output)" else ""
            raise McpToolError(s.redact(message[:_TOOL_ERROR_CHARS]) or "the tool failed without saying why")
        return text

    # ----------------------------------------------------------------- state and reporting

    def _reason(self, s: _Server, link: _Link, exc: BaseException) -> str:
        """One redacted line on why a connection attempt failed."""
        from mcp.shared.exceptions import MCPError

        cfg = s.config
        leaves = [e for e in _leaves(exc) if not isinstance(e, asyncio.CancelledError)] or [exc]
        first = leaves[0]
        phase = "" if link.phase == "running" else f"{link.phase}: "
        if isinstance(first, _Failure):
            text = str(first)
        elif isinstance(first, MCPError):
            text = f"{phase}{first.message}"
        elif isinstance(first, httpx2.TransportError) and cfg.url:
            text = f"{phase}cannot reach {url_without_secrets(cfg.url)}: {type(first).__name__}: {first}"
        elif isinstance(first, OSError) and cfg.command and link.phase == "start":
            text = f"cannot start {cfg.command!r}: {first.strerror or first}"
            if first.filename not in (None, cfg.command):  # e.g. the working directory
                text += f": {first.filename}"
        else:
            detail = str(first)
            text = f"{phase}{type(first).__name__}" + (f": {detail}" if detail else "")
        if link.http_status and link.http_status not in text:
            text += f" ({link.http_status})"
        return s.redact(_one_line(text, _ERROR_CHARS))

    def _became_ready(self, s: _Server) -> None:
        if s.failing:
            log.info(
                "MCP server %r is ready again: %d tools (restarts so far: %d)", s.config.name, len(s.offered), s.restarts
            )
            s.failing = False
        else:
            log.info("MCP server %r is ready: %d tools", s.config.name, len(s.offered))
        s.error = None
        s.retry_at = None
        self._set(s, "ready")
        s.settled.set()

    def _set(self, s: _Server, state: State) -> None:
        if s.state != state:
            s.state = state
            self._changed(s)

    def _status(self, s: _Server) -> McpServerStatus:
        retry_in = None
        if s.state == "failed" and s.retry_at is not None:
            retry_in = round(max(0.0, s.retry_at - time.monotonic()), 3)
        return McpServerStatus(
            s.config.name, s.config.transport, s.state, len(s.offered), s.error, s.restarts, retry_in
        )

    def _changed(self, s: _Server) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(self._status(s))
        except Exception:  # an observer's bug must not stop supervision
            log.exception("MCP on_change callback failed")

    def _hold_secrets(self) -> None:
        if not self._holding_secrets:
            _SDK_LOG_REDACTION.hold(self._secrets, +1)
            self._holding_secrets = True

    def _release_secrets(self) -> None:
        if self._holding_secrets:
            _SDK_LOG_REDACTION.hold(self._secrets, -1)
            self._holding_secrets = False
