"""Tools the agent can call: the registry, the `@tool` decorator and the built-ins."""

from __future__ import annotations

from .builtins import current_time, make_fetch_url
from .registry import Tool, ToolRegistry, schema_from_signature, tool

__all__ = ["Tool", "ToolRegistry", "current_time", "make_fetch_url", "schema_from_signature", "tool"]
