"""MCP servers that fail: crash, hang, freeze, never start, vanish -- and secrets that
must not leak while they do. Real subprocesses, real SDK; every wait is on a condition
with a bound (`McpWatch.until`), back-off made small."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import psutil
import pytest

from agent import ToolCall, ToolRegistry
from agent.tools.mcp import McpServerConfig
pytest.register_assert_rewrite("tests.fakes.mcp_fixtures")  # before the import below

from tests.fakes.mcp_fixtures import Make, fake_mcp_children, run, started, stdio_config  # noqa: E402

pytest_plugins = ["tests.fakes.mcp_fixtures"]  # make_servers, mcp_http

SECRET = "sk-SECRET123"
FAKE_TOOLS = 11  # the fake's own tools


def warnings_about(caplog: pytest.LogCaptureFixture, server: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agent.tools.mcp" and r.levelno == logging.WARNING and f"MCP server {server!r}" in r.getMessage()
    ]


async def test_a_hanging_call_times_out_and_the_server_keeps_working(make_servers: Make) -> None:
    servers, registry, _ = await started(make_servers, stdio_config("fake", call_timeout=1.0))
    began = time.monotonic()
    result = await run(registry, "fake__hang", seconds=30)
    elapsed = time.monotonic() - began
    assert result.is_error and "did not answer within 1 s" in result.content
    assert 0.9 <= elapsed < 2.5, elapsed
    assert (await run(registry, "fake__echo", text="alive")).content == "alive"
    (status,) = servers.status()
    assert status.state == "ready" and status.restarts == 0  # the ping after the timeout was answered


async def test_a_frozen_server_is_found_by_ping_and_restarted(
    make_servers: Make, caplog: pytest.LogCaptureFixture
) -> None:
    servers, registry, watch = await started(make_servers, stdio_config("fake", call_timeout=1.0), ping_timeout=1.0)
    (pid,) = fake_mcp_children()
    os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
    try:
        result = await run(registry, "fake__echo", text="anyone?")
        assert result.is_error and "did not answer within 1 s" in result.content
        await watch.until(lambda: servers.status()[0].state == "failed", timeout=10)
        assert "stopped answering" in (servers.status()[0].error or "")
        await watch.until(lambda: servers.status()[0].state == "ready", timeout=30)
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (await run(registry, "fake__echo", text="new process")).content == "new process"
    assert len(warnings_about(caplog, "fake")) == 1


async def test_a_crash_withdraws_the_tools_is_logged_once_and_the_server_comes_back(
    make_servers: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.tools.mcp")
    servers, registry, watch = await started(make_servers, stdio_config("fake"), backoff_base=0.5)
    failed_seen: list[Any] = []
    result = await run(registry, "fake__crash")
    assert result.is_error and "MCP server 'fake' is not available right now" in result.content
    await watch.until(lambda: servers.status()[0].state == "failed", timeout=10)
    failed_seen.append(servers.status()[0])
    assert "fake__echo" not in registry and len(registry) == 0
    await watch.until(lambda: "fake__echo" in registry, timeout=20)
    (status,) = servers.status()
    assert status.state == "ready" and status.restarts == 1 and status.error is None
    assert failed_seen[0].error == "the server process exited" and failed_seen[0].tools == 0
    assert failed_seen[0].retry_in is not None and 0 < failed_seen[0].retry_in <= 0.5
    assert warnings_about(caplog, "fake") == [
        f"MCP server 'fake' failed: the server process exited; {FAKE_TOOLS} tools withdrawn, retrying in 0.5 s"
    ]
    assert any("MCP server 'fake' is ready again: 11 tools (restarts so far: 1)" in r.getMessage() for r in caplog.records)
    assert (await run(registry, "fake__echo", text="back")).content == "back"


async def test_a_bad_command_fails_alone_backs_off_and_is_reported_once(
    make_servers: Make, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ToolRegistry()
    servers, watch = make_servers(
        [McpServerConfig(name="nope", command="/nonexistent/mcp", restart_max=0.4), stdio_config("good")],
        registry,
        backoff_base=0.05,
    )
    await servers.start()
    await servers.ready(30)
    await watch.until(lambda: servers.status()[0].restarts >= 5, timeout=20)
    delays = [s.retry_in for s in watch.statuses if s.name == "nope" and s.state == "failed"]
    assert delays[:5] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4], abs=0.02)  # doubling, capped at restart_max
    nope, good = servers.status()
    assert nope.state == "failed" and nope.error == "cannot start '/nonexistent/mcp': No such file or directory"
    assert good.state == "ready" and (await run(registry, "good__echo", text="fine")).content == "fine"
    assert len(warnings_about(caplog, "nope")) == 1  # one streak, however many attempts
    assert not any(name.startswith("nope__") for name in registry.names())


async def test_a_server_that_exits_at_once_or_never_answers_fails_and_leaves_no_process(make_servers: Make) -> None:
    exits = McpServerConfig(name="exits", command=sys.executable, args=("-c", "raise SystemExit(3)"))
    silent = McpServerConfig(
        name="silent", command=sys.executable, args=("-c", "import time; time.sleep(60)"), startup_timeout=1.0
    )
    servers, _ = make_servers([exits, silent], backoff_base=30.0)
    await servers.start()
    statuses = await servers.ready(20)
    assert [s.state for s in statuses] == ["failed", "failed"]
    assert statuses[0].error == "initialize: Connection closed"
    assert statuses[1].error == "initialize: no answer within startup_timeout (1 s)"
    children = [p for p in psutil.Process().children(recursive=True) if "time.sleep(60)" in " ".join(p.cmdline())]
    assert children == []  # the silent one was killed when its startup timed out


@pytest.mark.parametrize(("stable_after", "second_delay"), [(600.0, 0.6), (0.0, 0.3)])
async def test_back_off_starts_over_only_after_a_stable_period(
    make_servers: Make, stable_after: float, second_delay: float
) -> None:
    servers, registry, watch = await started(make_servers, stdio_config("fake"), backoff_base=0.3, stable_after=stable_after)
    for _ in range(2):
        await run(registry, "fake__crash")
        await watch.until(lambda: servers.status()[0].state == "failed", timeout=10)
        await watch.until(lambda: servers.status()[0].state == "ready", timeout=20)
    delays = [s.retry_in for s in watch.statuses if s.state == "failed"]
    assert delays == pytest.approx([0.3, second_delay], abs=0.05)


async def test_not_started_is_stopped_and_a_bad_working_directory_is_named(make_servers: Make) -> None:
    servers, _ = make_servers([stdio_config("fake", cwd="/nonexistent/dir")], backoff_base=30.0)
    assert [s.state for s in await servers.ready(0.1)] == ["stopped"]  # returns at once: nothing started
    await servers.start()
    (status,) = await servers.ready(20)
    assert status.state == "failed"
    assert status.error == f"cannot start {sys.executable!r}: No such file or directory: /nonexistent/dir"


async def test_a_killed_http_server_is_withdrawn_and_used_again_when_it_returns(
    make_servers: Make, mcp_http: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await mcp_http()
    servers, registry, watch = await started(make_servers, McpServerConfig(name="web", url=fake.url))
    await fake.kill()  # SIGKILL; no call in flight: the idle ping finds out
    await watch.until(lambda: "web__echo" not in registry, timeout=15)
    status = servers.status()[0]
    assert status.state in ("failed", "starting") and "cannot reach http://127.0.0.1:" in (status.error or "")
    result = await run(registry, "web__echo", text="x")
    assert result.is_error and "unknown tool" in result.content  # withdrawn: the model is not offered it
    await fake.restart()  # same port
    await watch.until(lambda: "web__echo" in registry, timeout=20)
    assert (await run(registry, "web__echo", text="again")).content == "again"
    assert len(warnings_about(caplog, "web")) == 1


async def test_a_call_to_a_server_that_is_down_says_so(make_servers: Make) -> None:
    servers, registry, watch = await started(make_servers, stdio_config("fake"), backoff_base=30.0)
    echo = registry.get("fake__echo")
    assert echo is not None
    await run(registry, "fake__crash")
    await watch.until(lambda: servers.status()[0].state == "failed", timeout=10)
    result = await registry.execute(echo, {"text": "hi"}, ToolCall("c", "fake__echo", "{}"))  # a turn that held it
    assert result.is_error
    assert result.content == "Error: McpServerUnavailable: MCP server 'fake' is not available right now"


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_cancelled_call_leaves_the_session_usable(make_servers: Make, mcp_http: Any, transport: str) -> None:
    config = McpServerConfig(name="fake", url=(await mcp_http()).url) if transport == "http" else stdio_config("fake")
    servers, registry, _ = await started(make_servers, config)
    call = asyncio.create_task(run(registry, "fake__hang", seconds=30))
    await asyncio.sleep(0.3)  # any moment will do: the call is in flight or about to be
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    began = time.monotonic()
    assert (await run(registry, "fake__echo", text="after stop")).content == "after stop"
    assert time.monotonic() - began < 2.0
    assert servers.status()[0].state == "ready" and servers.status()[0].restarts == 0


async def test_aclose_terminates_and_reaps_stdio_children(make_servers: Make) -> None:
    servers, registry, _ = await started(make_servers, stdio_config("a"), stdio_config("b"))
    pids = fake_mcp_children()
    assert len(pids) == 2
    busy = asyncio.create_task(run(registry, "a__hang", seconds=30))  # a call still in flight
    await asyncio.sleep(0.2)
    await servers.aclose()
    result = await busy
    assert result.is_error and "not available right now" in result.content
    for pid in pids:
        assert not psutil.pid_exists(pid), f"child {pid} left behind ({psutil.Process(pid).status()})"
    assert fake_mcp_children() == []
    assert len(registry) == 0 and [s.state for s in servers.status()] == ["stopped", "stopped"]


async def test_secrets_never_reach_logs_statuses_or_tool_errors(
    make_servers: Make, mcp_http: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, every logger: ours, the SDK's, httpx2's
    guarded = await mcp_http("--auth", "the-right-token")
    doomed = await mcp_http()
    configs = [
        McpServerConfig(name="badcmd", command="/nonexistent/mcp", env={"API_KEY": SECRET}),
        stdio_config("crashy", env={"API_KEY": SECRET}),
        McpServerConfig(name="unauth", url=guarded.url, headers={"Authorization": f"Bearer {SECRET}"}),
        McpServerConfig(name="deadport", url=f"http://user:{SECRET}@127.0.0.1:9/mcp?api_key={SECRET}"),
        McpServerConfig(name="killed", url=f"{doomed.url}?token={SECRET}", headers={"X-Api-Key": SECRET}),
    ]
    registry = ToolRegistry()
    servers, watch = make_servers(configs, registry, backoff_base=0.2)
    await servers.start()
    await servers.ready(30)
    first_failure = {s.name: s.error or "" for s in reversed(watch.statuses) if s.state == "failed"}
    assert "HTTP 401 Unauthorized" in first_failure["unauth"]
    assert "cannot reach http://127.0.0.1:9/mcp" in first_failure["deadport"]
    await watch.until(lambda: registry.get("crashy__crash") and registry.get("killed__echo"), timeout=20)
    results = [await run(registry, "crashy__crash"), await run(registry, "killed__whoami", name="X-Api-Key")]
    await doomed.kill()
    results.append(await run(registry, "killed__echo", text="x"))
    await watch.until(lambda: all(s.state != "ready" for s in servers.status()), timeout=20)
    await watch.until(lambda: all(s.restarts >= 1 for s in servers.status()), timeout=20)

    texts = [r.getMessage() + "\n" + (r.exc_text or "") for r in caplog.records]
    texts += [repr(s) for s in servers.status()] + [repr(s) for s in watch.statuses] + [r.content for r in results]
    leaks = [t for t in texts if SECRET in t]
    assert leaks == []
    assert any("cannot start '/nonexistent/mcp'" in t for t in texts)  # the failures were logged...
    assert any("MCP server 'killed' failed" in t for t in texts)  # ...with their reasons
    assert json.loads(results[1].content) == {"env": False, "header": True}  # the header was sent
