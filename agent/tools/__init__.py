"""Tools the agent can call: the registry, the `@tool` decorator, the built-ins and MCP servers."""

from __future__ import annotations

from .builtins import current_time, make_fetch_url
from .mcp import McpServerConfig, McpServers, McpServerStatus, McpServerUnavailable, McpToolError
from .registry import Tool, ToolRegistry, schema_from_signature, tool

__all__ = [
    "McpServerConfig",
    "McpServerStatus",
    "McpServerUnavailable",
    "McpServers",
    "McpToolError",
    "Tool",
    "ToolRegistry",
    "current_time",
    "make_fetch_url",
    "schema_from_signature",
    "tool",
]
