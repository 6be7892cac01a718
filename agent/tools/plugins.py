"""Tools from outside parley: Python modules named in the config, and installed packages.

`tools.modules: [my_pkg.weather]` imports each module and takes every module-level `Tool`
(a function decorated with `@tool`), in definition order. A package can also offer tools
without any config edit beyond installing it, through the `parley.tools` entry-point
group (`[project.entry-points."parley.tools"] weather = "my_pkg.weather"`); an entry
point may name a module, a `Tool`, a list of them, or a function returning either.

A module the config names that cannot be imported is an error at start-up (the operator
asked for it). A broken installed package is logged and skipped: an unrelated package
must not stop the bot. Tools from here count as `source="module:<name>"`: by default only
admins may trigger them (`bots.tool_policy`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ToolError
from .registry import Tool

__all__ = ["ENTRY_POINT_GROUP", "entry_point_tools", "module_tools"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "parley.tools"


def module_tools(names: Sequence[str], *, search: Iterable[str | os.PathLike[str]] = ()) -> list[Tool]:
    """The tools of each named module; raises `ToolError` naming a module that fails.

    Modules are imported from the Python path, and else from the `search` folders (the
    working directory, the config file's folder), so `parley run` finds a `my_tools.py`
    that sits next to `parley.yaml`.
    """
    found: list[Tool] = []
    for name in names:
        module = _import(name, search)
        tools = _tools_of(module, f"module:{name}")
        if not tools:
            raise ToolError(f"module {name} defines no tools (decorate functions with @tool from agent)")
        found.extend(tools)
    return found


def entry_point_tools() -> list[Tool]:
    """The tools installed packages offer through the `parley.tools` entry-point group."""
    found: list[Tool] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            tools = _tools_of(ep.load(), f"module:{ep.value.split(':')[0]}")
        except Exception as exc:  # a broken package must not stop the bot
            log.warning("entry point %s (%s) gave no tools: %s: %s", ep.name, ep.value, type(exc).__name__, exc)
            continue
        if not tools:
            log.warning("entry point %s (%s) gave no tools", ep.name, ep.value)
        found.extend(tools)
    return found


def _import(name: str, search: Iterable[str | os.PathLike[str]]) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):  # something the module imports is missing
            raise ToolError(f"module {name} could not be imported: {exc}") from None
    except Exception as exc:
        raise ToolError(f"module {name} failed to import: {type(exc).__name__}: {exc}") from None
    for folder in search:
        path = str(Path(folder).resolve())
        if path in sys.path:
            continue
        sys.path.append(path)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            sys.path.remove(path)
            if exc.name is None or not name.startswith(exc.name):
                raise ToolError(f"module {name} could not be imported: {exc}") from None
        except Exception as exc:
            raise ToolError(f"module {name} failed to import: {type(exc).__name__}: {exc}") from None
    raise ToolError(f"module {name} was not found (not on the Python path, nor next to the config file)")


def _tools_of(obj: Any, source: str) -> list[Tool]:
    """Tools found in what a module or entry point gives, marked with where they came from."""
    if isinstance(obj, types.ModuleType):
        items: Iterable[Any] = (v for k, v in vars(obj).items() if not k.startswith("_"))
    elif isinstance(obj, Tool):
        items = [obj]
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif callable(obj):
        given = obj()
        items = given if isinstance(given, (list, tuple)) else [given]
    else:
        raise ToolError(f"expected a module, a Tool or a list of them, got {type(obj).__name__}")
    tools: list[Tool] = []
    for item in items:
        if isinstance(item, Tool) and item not in tools and not item.source.startswith("builtin"):
            item.source = source if item.source in ("module", "") else item.source
            tools.append(item)
    return tools
