"""MCP servers as tools, through the official `mcp` SDK (client side).

INTERFACE (fixed; the implementation is being written):

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["McpServerConfig", "McpServerStatus", "McpServers"]


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


class McpServers:  # pragma: no cover - being written
    ...
