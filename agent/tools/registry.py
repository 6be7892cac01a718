"""Tools the model may call: a registry of async functions with JSON-schema parameters.

Adding your own tool::

    from typing import Annotated
    from agent import ToolRegistry, tool

    @tool
    async def get_weather(city: Annotated[str, "City name, e.g. Paris"], unit: str = "C") -> str:
        \"\"\"Current weather for a city.\"\"\"
        return f"18 {unit} and sunny in {city}"

    registry = ToolRegistry.default()   # current_time (fetch_url stays off unless asked for)
    registry.add(get_weather)
    agent = Agent(cfg, tools=registry)

`@tool` derives the schema from the signature (str/int/float/bool/list/dict, `Literal`
→ enum, defaults → optional, `Annotated[..., "text"]` → description) and the
description from the docstring; pass `parameters=` for a hand-written schema and
`timeout=` to bound one call. A plain (sync) function works too: it runs in a worker
thread (`asyncio.to_thread`), so a blocking call in it never stalls the chats -- but a
thread cannot be cancelled, so a timed-out or stopped sync tool finishes in the
background; prefer `async def` for anything slow. Whatever the function returns is sent to the model
(strings as-is, anything else as JSON). An exception or timeout becomes an error
result the model can read; it never breaks the turn. Arguments that are not a JSON
object never reach the function.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, overload

from ..errors import ToolError
from ..events import ToolCall, ToolResult

__all__ = ["Tool", "ToolRegistry", "tool"]

log = logging.getLogger(__name__)

MAX_RESULT_CHARS = 16_000

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}


@dataclass(slots=True)
class Tool:
    """One callable tool: `func(**arguments)` is awaited with the model's arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    func: Callable[..., Awaitable[Any]]
    timeout: float | None = 30.0
    # Where it came from: "builtin", "module:<python module>", "mcp:<server>". Policy
    # defaults follow it (bots.tool_policy): built-ins that read nothing private are for
    # every user, everything else for admins until the configuration says otherwise.
    source: str = "module"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "a").replace("-", "a").isalnum():
            raise ToolError(f"tool name must be [A-Za-z0-9_-]+, got {self.name!r}")
        if len(self.name) > 64:
            raise ToolError(f"tool name must be at most 64 characters, got {len(self.name)}")
        if not inspect.iscoroutinefunction(self.func):
            raise ToolError(f"tool {self.name!r}: func must be an async function (use @tool for a sync one)")
        if self.parameters.get("type") != "object":
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")

    def schema(self, api: str = "chat_completions") -> dict[str, Any]:
        """The tool definition in the wire shape of `api` ("chat_completions" or "responses")."""
        if api == "responses":
            return {
                "type": "function",
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def _schema_for(annotation: Any) -> dict[str, Any]:
    description = None
    if get_origin(annotation) is typing.Annotated:
        annotation, *meta = get_args(annotation)
        description = next((m for m in meta if isinstance(m, str)), None)
    origin = get_origin(annotation)
    schema: dict[str, Any]
    if origin is Literal:
        values = list(get_args(annotation))
        schema = {"enum": values}
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
    elif origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        schema = _schema_for(members[0]) if len(members) == 1 else {}
    elif origin in (list, tuple):
        schema = {"type": "array"}
        item_args = get_args(annotation)
        if item_args and item_args[0] is not Ellipsis:
            schema["items"] = _schema_for(item_args[0])
    elif origin is dict:
        schema = {"type": "object"}
    elif annotation in _JSON_TYPES:
        schema = {"type": _JSON_TYPES[annotation]}
    else:
        schema = {}
    if description:
        schema = {**schema, "description": description}
    return schema


def schema_from_signature(func: Callable[..., Any]) -> dict[str, Any]:
    """Derive a JSON schema (type object) from a function's parameters and type hints."""
    hints = typing.get_type_hints(func, include_extras=True)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        properties[name] = _schema_for(hints.get(name, Any))
        if param.default is param.empty:
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return inspect.cleandoc(doc).split("\n\n", 1)[0].replace("\n", " ").strip()


@overload
def tool(func: Callable[..., Awaitable[Any]], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: float | None = 30.0,
    source: str = "module",
) -> Callable[[Callable[..., Awaitable[Any]]], Tool]: ...


def tool(
    func: Callable[..., Awaitable[Any]] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: float | None = 30.0,
    source: str = "module",
) -> Tool | Callable[[Callable[..., Awaitable[Any]]], Tool]:
    """Turn a function into a `Tool` (usable as `@tool` or `@tool(name=..., timeout=...)`).

    Async functions are awaited; sync ones run in a worker thread (see the module doc)."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        return Tool(
            name=name or fn.__name__,
            description=description if description is not None else _first_paragraph(fn.__doc__),
            parameters=parameters if parameters is not None else schema_from_signature(fn),
            func=fn if inspect.iscoroutinefunction(fn) else _in_thread(fn),
            timeout=timeout,
            source=source,
        )

    return wrap(func) if func is not None else wrap


def _in_thread(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """An async stand-in for a sync tool function: it runs in a worker thread."""

    @functools.wraps(fn)
    async def run(**kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, **kwargs)

    return run


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[truncated: result was {len(text)} characters]"
    return text


class ToolRegistry:
    """The tools offered to the model, by name.

    `prepare` + `execute` are split so the turn can fire `on_tool_started` only for
    calls that will really run (a call with bad arguments never starts).
    """

    def __init__(self, tools: Iterable[Tool | Callable[..., Awaitable[Any]]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    @classmethod
    def default(
        cls,
        *,
        fetch_url: bool = False,
        allow_private: bool = False,
        fetch_max_bytes: int = 200_000,
        fetch_timeout: float = 10.0,
    ) -> ToolRegistry:
        """The built-ins: `current_time` always; `fetch_url` only when asked for."""
        from .builtins import current_time, make_fetch_url

        registry = cls([current_time])
        if fetch_url:
            registry.add(make_fetch_url(max_bytes=fetch_max_bytes, timeout=fetch_timeout, allow_private=allow_private))
        return registry

    def add(self, item: Tool | Callable[..., Awaitable[Any]]) -> Tool:
        """Register a `Tool` (or an async function, wrapped with `tool`). Names are unique."""
        new = item if isinstance(item, Tool) else tool(item)
        if new.name in self._tools:
            raise ToolError(f"a tool named {new.name!r} is already registered")
        self._tools[new.name] = new
        return new

    def remove(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def schemas(self, api: str = "chat_completions") -> list[dict[str, Any]]:
        return [t.schema(api) for t in self._tools.values()]

    def subset(self, keep: Callable[[Tool], bool]) -> ToolRegistry:
        """A registry of the tools `keep` accepts (the same `Tool` objects): what one turn
        offers its caller. Tools added to or removed from this one later do not change it."""
        view = ToolRegistry()
        view._tools = {name: t for name, t in self._tools.items() if keep(t)}
        return view

    def prepare(self, call: ToolCall) -> tuple[Tool, dict[str, Any]] | ToolResult:
        """Validate a call: the tool exists and the arguments are a JSON object with the required keys.

        Returns the tool and parsed arguments, or the error result to send back instead.
        """
        found = self._tools.get(call.name)
        if found is None:
            known = ", ".join(self._tools) or "none"
            return ToolResult(call.id, call.name, f"Error: unknown tool {call.name!r}. Available tools: {known}.", True)
        raw = call.arguments.strip()
        try:
            args = json.loads(raw) if raw else {}
        except ValueError as exc:
            return ToolResult(
                call.id,
                call.name,
                f"Error: the arguments are not valid JSON ({exc}); the tool was not run. "
                "Call it again with a JSON object.",
                True,
            )
        if not isinstance(args, dict):
            return ToolResult(call.id, call.name, "Error: the arguments must be a JSON object; the tool was not run.", True)
        missing = [key for key in found.parameters.get("required", ()) if key not in args]
        if missing:
            return ToolResult(
                call.id, call.name, f"Error: missing required argument(s): {', '.join(missing)}; the tool was not run.", True
            )
        return found, args

    async def execute(self, found: Tool, args: dict[str, Any], call: ToolCall) -> ToolResult:
        """Run a prepared call; exceptions and timeouts become error results (cancellation propagates)."""
        try:
            async with asyncio.timeout(found.timeout):
                value = await found.func(**args)
        except TimeoutError:
            log.info("tool %s timed out after %ss (call %s)", found.name, found.timeout, call.id)
            return ToolResult(call.id, found.name, f"Error: the tool timed out after {found.timeout:g} seconds.", True)
        except Exception as exc:  # a tool bug must not break the turn
            log.info("tool %s failed (call %s): %s: %s", found.name, call.id, type(exc).__name__, exc)
            return ToolResult(call.id, found.name, f"Error: {type(exc).__name__}: {exc}", True)
        return ToolResult(call.id, found.name, _to_text(value))

    async def run(self, call: ToolCall) -> ToolResult:
        """`prepare` then `execute`: the result to send back to the model."""
        prepared = self.prepare(call)
        if isinstance(prepared, ToolResult):
            return prepared
        return await self.execute(prepared[0], prepared[1], call)
