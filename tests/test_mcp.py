"""MCP servers as tools: listing, calling and results, against the fake MCP server.

Real subprocesses and the real SDK on both sides (`tests/fakes/mcp_server.py`); calls go
through `ToolRegistry.run`, so what is asserted is what the model would read.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from agent import Tool, ToolCall, ToolRegistry
from agent.tools.mcp import McpServerConfig, McpServers, McpServerStatus, _safe_name, secret_values
pytest.register_assert_rewrite("tests.fakes.mcp_fixtures")  # before the import below

from tests.fakes.mcp_fixtures import REPO, Make, fake_mcp_children, run, started, stdio_config  # noqa: E402

pytest_plugins = ["tests.fakes.mcp_fixtures"]  # make_servers, mcp_http

FAKE_TOOLS = {"echo", "add", "stats", "fail", "hang", "image", "resource", "big", "crash", "grow", "whoami"}
NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")

# ---------------------------------------------------------------------------- listing


async def test_stdio_tools_are_listed_with_their_schemas_across_pages(make_servers: Make) -> None:
    servers, registry, _ = await started(make_servers, stdio_config("fake", "--page-size", "3"))
    assert set(registry.names()) == {f"fake__{name}" for name in FAKE_TOOLS}  # 4 pages followed
    add = registry.get("fake__add")
    assert add is not None and add.source == "mcp:fake"
    assert add.description == "Add two integers."
    assert add.parameters["type"] == "object"
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert add.parameters["required"] == ["a", "b"]
    (status,) = servers.status()
    assert status == McpServerStatus("fake", "stdio", "ready", tools=len(FAKE_TOOLS))


async def test_http_tools_are_listed_and_called(make_servers: Make, mcp_http: Any) -> None:
    fake = await mcp_http()
    _, registry, _ = await started(make_servers, McpServerConfig(name="web", url=fake.url))
    assert set(registry.names()) == {f"web__{name}" for name in FAKE_TOOLS}
    assert registry.get("web__echo").parameters["required"] == ["text"]  # type: ignore[union-attr]
    echoed = await run(registry, "web__echo", text="über 🙂")
    assert (echoed.content, echoed.is_error) == ("über 🙂", False)
    assert (await run(registry, "web__add", a=2, b=40)).content == "42"


async def test_a_tool_with_an_invalid_schema_is_skipped_with_a_log_line(
    make_servers: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.tools.mcp")
    _, registry, _ = await started(make_servers, stdio_config("fake", "--broken-schema"))
    assert "fake__broken" not in registry and "fake__echo" in registry
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "'broken'" in skipped[0] and "not valid JSON Schema" in skipped[0], skipped


def test_names_are_made_safe_short_and_unique() -> None:
    assert _safe_name("files", "read.file/v2", set()) == "files__read_file_v2"
    long = _safe_name("s" * 40, "t" * 40, set())
    assert len(long) == 64 and NAME_RULE.fullmatch(long)
    taken = {long}
    second = _safe_name("s" * 40, "t" * 41, taken)  # same 64-character prefix
    assert second != long and len(second) == 64 and second.endswith("_2")


async def test_names_stay_unique_when_truncation_collides_and_with_other_tools(make_servers: Make) -> None:
    registry = ToolRegistry()

    async def fake__echo() -> str:
        return "a built-in that happens to have the name"

    registry.add(Tool("fake__echo", "not from MCP", {"type": "object", "properties": {}}, fake__echo))
    long_name = "m" * 62  # "<62 chars>__" is already 64: every tool of this server collides
    servers, _ = make_servers([stdio_config("fake"), stdio_config(long_name, "--many", "3")], registry)
    await servers.start()
    assert all(s.state == "ready" for s in await servers.ready(30))
    names = registry.names()
    assert len(names) == len(set(names)) == 1 + 2 * len(FAKE_TOOLS) + 3
    assert all(NAME_RULE.fullmatch(n) for n in names), names
    assert registry.get("fake__echo").description == "not from MCP"  # type: ignore[union-attr]
    assert (await run(registry, "fake__echo_2", text="mcp")).content == "mcp"
    assert sum(n.startswith("m" * 60) for n in names) == len(FAKE_TOOLS) + 3


# ---------------------------------------------------------------------------- results


async def test_results_become_text_for_the_model(make_servers: Make) -> None:
    _, registry, _ = await started(make_servers, stdio_config("fake"))
    assert (await run(registry, "fake__add", a=1, b=2)).content == "3"  # the text block, not also {"result": 3}
    stats = await run(registry, "fake__stats")  # structured content only
    assert json.loads(stats.content) == {"count": 3, "names": ["a", "b", "c"]}
    image = await run(registry, "fake__image")
    assert not image.is_error and re.fullmatch(r"\[image: image/png, \d+ bytes\]", image.content), image.content
    resource = await run(registry, "fake__resource")
    assert resource.content == "the note\n[resource: memo://blob, application/pdf, 2 KB]"


async def test_is_error_reaches_the_model_as_an_error_result(make_servers: Make) -> None:
    _, registry, _ = await started(make_servers, stdio_config("fake"))
    result = await run(registry, "fake__fail", message="the disk is full")
    assert result.is_error
    assert result.content.startswith("Error: McpToolError: ") and "the disk is full" in result.content
    unknown = await registry.run(ToolCall("c", "fake__echo", json.dumps({"text": 5})))  # the server rejects it
    assert unknown.is_error and unknown.content.startswith("Error: McpToolError: ")


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_10_mb_result_is_truncated_and_nothing_breaks(make_servers: Make, mcp_http: Any, transport: str) -> None:
    if transport == "http":
        config = McpServerConfig(name="fake", url=(await mcp_http()).url, call_timeout=60)
    else:
        config = stdio_config("fake", call_timeout=60)
    servers, registry, _ = await started(make_servers, config)
    result = await run(registry, "fake__big", size=10_000_000)
    assert not result.is_error, result.content[:300]
    assert result.content.startswith("0123456789abcdef") and len(result.content) < 17_000
    assert "[truncated: result was 10000000 characters]" in result.content
    assert (await run(registry, "fake__echo", text="still here")).content == "still here"
    assert servers.status()[0].state == "ready"


# ---------------------------------------------------------------------------- list_changed


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_list_changed_adds_the_new_tool(make_servers: Make, mcp_http: Any, transport: str) -> None:
    config = McpServerConfig(name="fake", url=(await mcp_http()).url) if transport == "http" else stdio_config("fake")
    servers, registry, watch = await started(make_servers, config)
    assert (await run(registry, "fake__grow")).content == "extra_1"
    await watch.until(lambda: "fake__extra_1" in registry, timeout=10)
    assert (await run(registry, "fake__extra_1", x=7)).content == "extra_1: 7"
    assert "fake__echo" in registry and servers.status()[0].tools == len(FAKE_TOOLS) + 1
    assert (await run(registry, "fake__grow")).content == "extra_2"
    await watch.until(lambda: "fake__extra_2" in registry, timeout=10)
    assert registry.get("fake__extra_1") is not None


# ---------------------------------------------------------------------------- environment, check


async def test_configured_env_and_headers_reach_the_server_but_parleys_environment_does_not(
    make_servers: Make, mcp_http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARLEY_OWN_SECRET", "not-for-children")
    fake = await mcp_http()
    stdio = stdio_config("local", env={"FAKE_TOKEN": "sk-SECRET123"})
    http = McpServerConfig(name="web", url=fake.url, headers={"X-Api-Key": "sk-SECRET123"})
    _, registry, _ = await started(make_servers, stdio, http)
    assert json.loads((await run(registry, "local__whoami", name="FAKE_TOKEN")).content)["env"] is True
    assert json.loads((await run(registry, "local__whoami", name="PARLEY_OWN_SECRET")).content)["env"] is False
    assert json.loads((await run(registry, "web__whoami", name="X-Api-Key")).content)["header"] is True


async def test_check_connects_once_lists_and_leaves_nothing_running(make_servers: Make, mcp_http: Any) -> None:
    fake = await mcp_http("--many", "5")
    registry = ToolRegistry()
    servers, _ = make_servers(
        [
            stdio_config("local"),
            McpServerConfig(name="web", url=fake.url),
            McpServerConfig(name="nope", command="/nonexistent/mcp-server"),
        ],
        registry,
    )
    statuses = await servers.check()
    assert [(s.name, s.state, s.tools) for s in statuses] == [
        ("local", "ready", len(FAKE_TOOLS)),
        ("web", "ready", len(FAKE_TOOLS) + 5),
        ("nope", "failed", 0),
    ]
    assert statuses[2].error == "cannot start '/nonexistent/mcp-server': No such file or directory"
    assert len(registry) == 0 and fake_mcp_children() == [fake.proc.pid]  # only the HTTP fake itself
    assert [s.state for s in servers.status()] == ["stopped"] * 3


def test_secret_values_cover_env_headers_and_url_credentials() -> None:
    config = McpServerConfig(
        name="x",
        url="https://user:pa%24%24word@mcp.example/v1?api_key=sk-QUERY123&x=1",
        headers={"Authorization": "Bearer sk-HEADER123"},
        env={"A": "sk-ENV12345", "B": "1"},
    )
    values = secret_values([config])
    for secret in ("sk-QUERY123", "Bearer sk-HEADER123", "sk-HEADER123", "sk-ENV12345", "pa$$word", "pa%24%24word"):
        assert secret in values
    assert "1" not in values and values == sorted(values, key=len, reverse=True)


def test_configs_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one of command"):
        McpServers([McpServerConfig(name="x")], ToolRegistry())
    with pytest.raises(ValueError, match="two MCP servers"):
        McpServers([McpServerConfig(name="x", url="http://a"), McpServerConfig(name="x", url="http://b")], ToolRegistry())
    with pytest.raises(ValueError, match="name"):
        McpServers([McpServerConfig(name="a b", url="http://a")], ToolRegistry())


def test_importing_the_module_does_not_import_the_sdk() -> None:
    """`import agent` must not pay for the mcp SDK when no MCP server is configured."""
    import subprocess
    import sys

    code = "import sys, agent, agent.tools.mcp; print('mcp' in sys.modules, 'jsonschema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]
