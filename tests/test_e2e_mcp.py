"""MCP tools in a chat, end to end: parley run's own wiring (config -> McpServers -> the
registry -> a turn) with the fake MCP server as a real subprocess over stdio, the real
python-telegram-bot connector and the real openai SDK against the fakes."""

from __future__ import annotations

import sys
from typing import Any

from tests.fakes.llm import Reply
from tests.fakes.mcp_fixtures import REPO, fake_mcp_children
from tests.support.conversations import start
from tests.support.crash import wait_until

USER_ID = 61


def mcp_tools(**policy: Any) -> dict[str, Any]:
    return {
        "mcp_servers": [
            {"name": "fake", "command": sys.executable, "args": ["-m", "tests.fakes.mcp_server", "stdio"],
             "cwd": str(REPO), "call_timeout": 5, "startup_timeout": 30},
        ],
        "policy": {"fake__*": {"allow": "user", **policy}},
    }


async def test_an_mcp_tool_is_called_and_answered_on_telegram(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=mcp_tools())
    app = s.p.app
    (status,) = await app.mcp.ready(30)
    assert status.state == "ready" and status.tools > 5
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    user = s.user(USER_ID)
    chat = s.private(user)
    fake_llm.script(Reply.tool_calls([("fake__add", {"a": 2, "b": 40})]), Reply.text("2 + 40 = 42."))
    assert await s.turn(chat, user, "add 2 and 40") == "2 + 40 = 42."
    offered = [t["function"]["name"] for t in fake_llm.requests[0].body["tools"]]
    assert "fake__add" in offered and "fake__echo" in offered
    assert fake_llm.requests[1].messages[-1]["content"] == "42"
    # /status shows the server
    assert "MCP fake: ready" in await s.ask(s.owner_chat(), s.owner, "/status")


async def test_a_dying_mcp_server_fails_its_call_is_withdrawn_and_comes_back(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=mcp_tools())
    app = s.p.app
    await app.mcp.ready(30)
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    user = s.user(USER_ID)
    chat = s.private(user)
    first_pid = fake_mcp_children()
    fake_llm.script(Reply.tool_calls([("fake__crash", {})]), Reply.text("The tool server crashed; sorry."))
    assert await s.turn(chat, user, "crash it") == "The tool server crashed; sorry."
    result = fake_llm.requests[1].messages[-1]["content"]
    assert result.startswith("Error:") and "Traceback" not in result
    # Withdrawn, then restarted with back-off: the tools come back, a new process serves them.
    await wait_until(lambda: app.mcp.status()[0].state == "ready" and app.mcp.status()[0].restarts >= 1,
                     timeout=30, what="the MCP server restarted")
    assert "fake__echo" in app.agent.tools
    assert fake_mcp_children() != first_pid
    fake_llm.script(Reply.tool_calls([("fake__echo", {"text": "back"})]), Reply.text("Back."))
    assert await s.turn(chat, user, "echo") == "Back."
    assert fake_llm.requests[-1].messages[-1]["content"] == "back"


async def test_an_mcp_tool_with_approval_is_asked_about_first(fast_telegram, fake_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, tools=mcp_tools(approval="ask_once_per_chat"))
    await s.p.app.mcp.ready(30)
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    user = s.user(USER_ID)
    chat = s.private(user)
    fake_llm.script(Reply.tool_calls([("fake__echo", {"text": "x" * 500})]), Reply.text("Echoed."))
    s.say(chat, user, "echo a lot")
    await fast_telegram.wait_for(lambda: any(m.has_buttons for m in s.bot_msgs(chat)), timeout=10)
    asked = next(m for m in s.bot_msgs(chat) if m.has_buttons)
    assert asked.text.startswith("🔐 Run fake__echo?\ntext: xxxx") and len(asked.text) < 120  # cut short
    fast_telegram.user_presses(chat, user, asked.message_id, asked.buttons[0][1])
    await s.settle(chat)
    assert s.bot_texts(chat) == ["Echoed."]
    # Asked once in this chat: the next call runs without a question.
    fake_llm.script(Reply.tool_calls([("fake__echo", {"text": "again"})]), Reply.text("Again."))
    assert await s.turn(chat, user, "again") == "Again."
    assert not any(m.has_buttons for m in s.bot_msgs(chat))


async def test_a_user_is_not_offered_mcp_tools_by_default(fast_telegram, fake_llm, parley) -> None:
    tools = mcp_tools()
    tools["policy"] = {}
    s = await start(parley, fast_telegram, fake_llm, tools=tools)
    await s.p.app.mcp.ready(30)
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    user = s.user(USER_ID)
    await s.turn(s.private(user), user, "hi")
    assert [t["function"]["name"] for t in fake_llm.requests[-1].body["tools"]] == ["current_time"]
    await s.turn(s.owner_chat(), s.owner, "hi")
    assert "fake__echo" in [t["function"]["name"] for t in fake_llm.requests[-1].body["tools"]]
