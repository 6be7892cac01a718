"""The tool registry, `@tool`, and the two built-ins (fetch_url against a local aiohttp server)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

import pytest
from aiohttp import web

from agent import Tool, ToolCall, ToolRegistry, tool
from agent.errors import ToolError
from agent.tools.builtins import FetchRefused, _PublicOnlyResolver, is_public_address, make_fetch_url


def call(name: str, args: object) -> ToolCall:
    return ToolCall("call_1", name, args if isinstance(args, str) else json.dumps(args))


def test_schema_is_derived_from_the_signature() -> None:
    @tool
    async def search(
        query: Annotated[str, "what to look for"],
        limit: int = 5,
        mode: Literal["fast", "deep"] = "fast",
        tags: list[str] | None = None,
        exact: bool = False,
    ) -> str:
        """Search the notes.

        Longer text that is not part of the description.
        """
        return query

    assert search.name == "search"
    assert search.description == "Search the notes."
    assert search.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "limit": {"type": "integer"},
            "mode": {"enum": ["fast", "deep"], "type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": "boolean"},
        },
        "required": ["query"],
    }
    assert search.schema("responses")["name"] == "search"
    assert search.schema("chat_completions")["function"]["parameters"] is search.parameters


def test_registry_rejects_duplicates_sync_funcs_given_directly_and_bad_names() -> None:
    @tool
    async def one() -> str:
        return "1"

    registry = ToolRegistry([one])
    with pytest.raises(ToolError, match="already registered"):
        registry.add(one)

    def sync() -> str:
        return "x"

    with pytest.raises(ToolError, match="async"):
        Tool("sync", "", {"type": "object"}, sync)  # type: ignore[arg-type]
    with pytest.raises(ToolError, match="name"):
        Tool("bad name!", "", {"type": "object"}, one.func)
    with pytest.raises(ToolError, match="64"):
        Tool("x" * 65, "", {"type": "object"}, one.func)


async def test_sync_tool_runs_in_a_worker_thread_without_blocking_the_loop() -> None:
    import threading
    import time as _time

    loop_thread = threading.get_ident()
    seen: list[int] = []

    @tool
    def slow_sum(a: int, b: int) -> int:
        """Adds slowly."""
        seen.append(threading.get_ident())
        _time.sleep(0.2)  # blocking on purpose: the loop must keep running meanwhile
        return a + b

    assert slow_sum.parameters["required"] == ["a", "b"]
    registry = ToolRegistry([slow_sum])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    result = await registry.run(call("slow_sum", {"a": 2, "b": 3}))
    ticking.cancel()
    assert result.content == "5" and not result.is_error
    assert seen and seen[0] != loop_thread
    assert ticks > 3  # the loop ran while the tool blocked its thread


def test_subset_keeps_only_what_is_accepted_and_is_a_snapshot() -> None:
    registry = ToolRegistry.default(fetch_url=True)
    view = registry.subset(lambda t: t.name == "current_time")
    assert view.names() == ["current_time"]
    assert view.get("current_time") is registry.get("current_time")
    registry.remove("current_time")
    assert view.names() == ["current_time"]
    assert {t.source for t in ToolRegistry.default(fetch_url=True)} == {"builtin"}
    assert ToolRegistry.default(fetch_url=True, allow_private=True).get("fetch_url").source == "builtin:private"


def test_default_registry_has_time_but_not_fetch() -> None:
    assert ToolRegistry.default().names() == ["current_time"]
    assert ToolRegistry.default(fetch_url=True).names() == ["current_time", "fetch_url"]


async def test_current_time_tool() -> None:
    registry = ToolRegistry.default()
    result = await registry.run(call("current_time", {"timezone": "Europe/Paris"}))
    assert not result.is_error
    stamp = result.content.split(" ")[0]
    assert datetime.fromisoformat(stamp).utcoffset() is not None
    assert "Europe/Paris" in result.content
    bad = await registry.run(call("current_time", {"timezone": "Mars/Olympus"}))
    assert bad.is_error and "unknown time zone" in bad.content


async def test_results_are_text_and_non_strings_become_json() -> None:
    @tool
    async def data() -> dict[str, int]:
        return {"a": 1}

    result = await ToolRegistry([data]).run(call("data", ""))  # empty arguments mean {}
    assert result.content == '{"a": 1}' and not result.is_error


@pytest.mark.parametrize("arguments", ['{"x": ', "[1, 2]", '"just a string"'])
async def test_arguments_that_are_not_a_json_object_never_run(arguments: str) -> None:
    ran = []

    @tool
    async def act(x: int = 0) -> str:
        ran.append(x)
        return "ran"

    result = await ToolRegistry([act]).run(call("act", arguments))
    assert result.is_error and "was not run" in result.content
    assert ran == []


async def test_unexpected_argument_becomes_an_error_result() -> None:
    @tool
    async def act(x: int) -> str:
        return "ran"

    result = await ToolRegistry([act]).run(call("act", {"x": 1, "y": 2}))
    assert result.is_error and "TypeError" in result.content


def test_public_address_check() -> None:
    for private in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "::1", "::ffff:127.0.0.1", "0.0.0.0",
                    "100.64.0.1", "fe80::1", "224.0.0.1"):
        assert not is_public_address(private), private
    for public in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public_address(public), public


async def test_resolver_refuses_names_that_resolve_to_private_addresses() -> None:
    resolver = _PublicOnlyResolver()
    try:
        with pytest.raises(FetchRefused):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


# -- fetch_url against a local server ------------------------------------------------------


@pytest.fixture
async def site() -> AsyncIterator[str]:
    never = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        html = "<html><head><style>p{}</style><script>alert(1)</script></head><body><h1>Title</h1><p>Body text</p></body></html>"
        return web.Response(text=html, content_type="text/html")

    async def big(request: web.Request) -> web.Response:
        return web.Response(text="x" * 50_000, content_type="text/plain")

    async def slow(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response(text="never")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/page")

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG", content_type="image/png")

    app = web.Application()
    for path, handler in (("/page", page), ("/big", big), ("/slow", slow), ("/loop", loop), ("/redirect", redirect),
                          ("/binary", binary)):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def fetch(url: str, **limits: object) -> tuple[bool, str]:
    registry = ToolRegistry([make_fetch_url(**limits)])  # type: ignore[arg-type]
    result = await registry.run(call("fetch_url", {"url": url}))
    return result.is_error, result.content


async def test_fetch_url_refuses_loopback_by_default(site: str) -> None:
    is_error, content = await fetch(f"{site}/page")
    assert is_error and "refusing" in content
    is_error, content = await fetch(site.replace("127.0.0.1", "localhost") + "/page")
    assert is_error and "refusing" in content


async def test_fetch_url_returns_page_text(site: str) -> None:
    is_error, content = await fetch(f"{site}/redirect", allow_private=True)
    assert not is_error
    assert content.endswith("Title\n\nBody text")
    assert "alert" not in content and "p{}" not in content
    assert f"URL: {site}/page" in content  # the redirect was followed


async def test_fetch_url_limits_bytes(site: str) -> None:
    is_error, content = await fetch(f"{site}/big", allow_private=True, max_bytes=1000)
    assert not is_error
    body = content.split("\n\n", 1)[1]
    assert body.count("x") == 1000
    assert "[truncated at 1000 bytes]" in content


async def test_fetch_url_limits_time(site: str) -> None:
    is_error, content = await fetch(f"{site}/slow", allow_private=True, timeout=0.2)
    assert is_error and "timed out" in content.lower()


async def test_fetch_url_limits_redirects_schemes_and_content_types(site: str) -> None:
    is_error, content = await fetch(f"{site}/loop", allow_private=True, max_redirects=3)
    assert is_error and "too many redirects" in content
    is_error, content = await fetch("file:///etc/passwd", allow_private=True)
    assert is_error and "only http and https" in content
    is_error, content = await fetch(f"{site}/binary", allow_private=True)
    assert not is_error and "not a text document" in content and "PNG" not in content
