"""pytest fixtures and helpers for the fake MCP server (`tests/fakes/mcp_server.py`).

A test module registers the fixtures itself (tests/conftest.py does not):

    from tests.fakes.mcp_fixtures import run, started, stdio_config

    pytest_plugins = ["tests.fakes.mcp_fixtures"]

- `stdio_config(name, *options, **fields)`: an `McpServerConfig` that starts the fake
  over stdio (`sys.executable -m tests.fakes.mcp_server stdio ...`, cwd = repo root).
- `mcp_http`: a factory fixture; `await mcp_http(*options)` starts the fake's HTTP
  variant as a real subprocess on a free 127.0.0.1 port and returns a `FakeMcpHttp`
  (its `url`, `port`, `kill()` with SIGKILL, `restart()` on the same port). Every process
  it started is killed after the test.
- `McpWatch`: an `on_change` observer for `McpServers` that lets a test wait for a
  condition (`await watch.until(lambda: ...)`) instead of sleeping.
- `fake_mcp_children()`: pids of live fake MCP server processes started by this process.
- `make_servers`: `make_servers(configs, registry=None, **kwargs)` -> `(McpServers, McpWatch)`
  with small back-off and ping intervals, closed after the test; `started(make_servers,
  *configs)` also starts them and waits until all are ready; `run(registry, name, **args)`
  calls a tool the way a turn does and returns the `ToolResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent import ToolCall, ToolRegistry, ToolResult
from agent.tools.mcp import McpServerConfig, McpServers, McpServerStatus

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0  # seconds for the HTTP fake to print its URL (imports on a busy box)


def fake_argv(transport: str, *options: str) -> list[str]:
    return ["-m", "tests.fakes.mcp_server", transport, *options]


def stdio_config(name: str = "fake", *options: str, **fields: Any) -> McpServerConfig:
    """An `McpServerConfig` that runs the fake over stdio; `fields` override the rest."""
    fields = {"command": sys.executable, "args": tuple(fake_argv("stdio", *options)), "cwd": str(REPO), **fields}
    return McpServerConfig(name=name, **fields)


def fake_mcp_children() -> list[int]:
    """Pids of this process's descendants that are fake MCP servers and not yet reaped."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "tests.fakes.mcp_server" in " ".join(child.cmdline()):
                found.append(child.pid)
    return found


@dataclass
class FakeMcpHttp:
    """The fake's HTTP variant in its own process."""

    options: tuple[str, ...]
    proc: asyncio.subprocess.Process | None = None
    url: str = ""
    port: int = 0
    history: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def start(self, port: int = 0) -> FakeMcpHttp:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *fake_argv("http", "--port", str(port), *self.options),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.history.append(self.proc)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), STARTUP_TIMEOUT)
        url = line.decode().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake MCP server did not start (exit {self.proc.returncode}, said {url!r})")
        self.url = url
        self.port = int(url.split(":")[2].split("/")[0])
        return self

    async def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def restart(self) -> FakeMcpHttp:
        """Start again on the same port."""
        return await self.start(self.port)

    async def close(self) -> None:
        for proc in self.history:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


@pytest.fixture
async def mcp_http() -> AsyncIterator[Callable[..., Awaitable[FakeMcpHttp]]]:
    started: list[FakeMcpHttp] = []

    async def start(*options: str) -> FakeMcpHttp:
        fake = FakeMcpHttp(options)
        started.append(fake)
        return await fake.start()

    try:
        yield start
    finally:
        for fake in started:
            await fake.close()


class McpWatch:
    """`on_change` for `McpServers`: records statuses and wakes waiters on every change."""

    def __init__(self) -> None:
        self.statuses: list[McpServerStatus] = []
        self._changed = asyncio.Event()

    def __call__(self, status: McpServerStatus) -> None:
        self.statuses.append(status)
        self._changed.set()

    async def until(self, predicate: Callable[[], Any], timeout: float = 20.0) -> None:
        """Wait until `predicate()` holds, re-checked after every change (and every 0.5 s,
        for conditions outside the servers' own state)."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.5)
        except TimeoutError:
            last = self.statuses[-5:]
            raise AssertionError(f"condition not met within {timeout}s; last statuses: {last}") from None


Make = Callable[..., tuple[McpServers, McpWatch]]


@pytest.fixture
async def make_servers() -> AsyncIterator[Make]:
    """`make_servers(configs, registry=None, **kwargs)` -> (McpServers, McpWatch), closed after the test."""
    made: list[McpServers] = []

    def make(configs: list[McpServerConfig], registry: ToolRegistry | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("backoff_base", 0.05)
        kwargs.setdefault("ping_interval", 0.5)
        kwargs.setdefault("ping_timeout", 3.0)
        watch = McpWatch()
        servers = McpServers(configs, registry if registry is not None else ToolRegistry(), on_change=watch, **kwargs)
        made.append(servers)
        return servers, watch

    try:
        yield make
    finally:
        for servers in made:
            await servers.aclose()


async def run(registry: ToolRegistry, tool_name: str, /, **args: Any) -> ToolResult:
    return await registry.run(ToolCall("call_1", tool_name, json.dumps(args)))


async def started(make: Make, *configs: McpServerConfig, **kwargs: Any) -> tuple[McpServers, ToolRegistry, McpWatch]:
    registry = ToolRegistry()
    servers, watch = make(list(configs), registry, **kwargs)
    await servers.start()
    statuses = await servers.ready(30)
    assert all(s.state == "ready" for s in statuses), statuses
    return servers, registry, watch
